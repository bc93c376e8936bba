"""The neuron map finds the right projections, sizes and storage orientation for every architecture."""

import pytest
import torch
from conftest import CONFIGS, make_model
from transformers.pytorch_utils import Conv1D

from neft_trl import build_neuron_map
from neft_trl.layers import dense_weight
from neft_trl.neurons import neuron_vectors

EXPECTED = {  # arch: (up name, down name, intermediate size, in-neuron has bias)
    "llama": ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", 48, False),
    "qwen2": ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", 40, False),
    "gpt2": ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", 64, True),
    "gpt_neox": ("gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h", 56, True),
    "phi": ("model.layers.0.mlp.fc1", "model.layers.0.mlp.fc2", 48, True),
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_map_finds_up_and_down_of_every_layer(arch):
    model = make_model(arch)
    nmap = build_neuron_map(model)
    up, down, inter, bias = EXPECTED[arch]
    assert [p.name for p in nmap][:2] == [up, down]
    assert nmap.num_layers == 2 and len(nmap) == 4
    assert nmap.intermediate_size == inter
    assert nmap.num_candidates == 2 * 2 * inter
    assert all("lm_head" not in p.name and "embed" not in p.name and "attn" not in p.name for p in nmap)
    up_proj = nmap.by_name[up]
    assert up_proj.trains_bias is bias
    assert up_proj.params_per_neuron == 32 + int(bias)
    assert nmap.by_name[down].params_per_neuron == 32  # the output bias is shared, never a neuron's


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_neuron_dim_indexes_the_stored_weight(arch):
    """weight.select(neuron_dim, n) must be neuron n, for Linear and for GPT-2's transposed Conv1D."""
    model = make_model(arch)
    for proj in build_neuron_map(model):
        weight = proj.module.weight.detach()
        dense = neuron_vectors(proj, dense_weight(proj.module))
        assert dense.shape == (proj.num_neurons, proj.vector_size)
        for n in (0, proj.num_neurons - 1):
            assert torch.equal(weight.select(proj.neuron_dim, n).float(), dense[n])
        assert isinstance(proj.module, Conv1D) == (arch == "gpt2")


def test_gate_and_mlp_units():
    model = make_model("llama")
    nmap = build_neuron_map(model, include_gate=True)
    assert [p.role for p in nmap][:3] == ["up", "gate", "down"]
    assert len(nmap.groups) == 6
    tied = build_neuron_map(model, unit="mlp", include_gate=True)
    assert len(tied.groups) == 2
    assert tied.groups[0].key == "model.layers.0.mlp"
    assert tied.groups[0].params_per_neuron == 3 * 32
    assert tied.num_candidates == 2 * 48
    assert tied.describe_candidate() == "one candidate is index n of up+gate+down taken together, counted once"
    assert nmap.describe_candidate() == "one candidate is one neuron vector"


def test_unknown_architecture_names_the_override():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match="neuron_modules"):
        build_neuron_map(model)


def test_neuron_modules_override():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3, self.w2 = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    model = torch.nn.ModuleList([MLP(), MLP()])
    nmap = build_neuron_map(model, include_gate=True, neuron_modules={"up": "w1", "gate": "w3", "down": "w2"})
    assert [p.name for p in nmap] == ["0.w1", "0.w3", "0.w2", "1.w1", "1.w3", "1.w2"]
    with pytest.raises(ValueError, match="must map 'up', 'down'"):
        build_neuron_map(model, neuron_modules={"up": "w1"})


def test_bad_unit():
    with pytest.raises(ValueError, match="neuron_unit"):
        build_neuron_map(make_model("llama"), unit="row")
