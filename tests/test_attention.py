"""Attention neurons (``neuron_targets="mlp,attention"``): rows of q/k/v (or a fused qkv) and columns of o are
candidates beside the MLP's, found for Llama-style and GPT-2 layouts, trained bit-exactly in hooks and delta mode
(and as deltas on a 4-bit model), saved and reloaded with the mask, and shown by role in reports and plots."""

from __future__ import annotations

import pytest
import torch
from conftest import make_dataset, make_model, make_tokenizer, tiny_args
from test_trainer_hooks import assert_only_selected_changed
from torch import nn

from neft_trl import Budget, NeFTConfig, NeFTSFTTrainer, NeuronMask, apply_neurons, build_neuron_map
from neft_trl.budget import select_top
from neft_trl.errors import UsageError
from neft_trl.functional import neuron_map_for_mask
from neft_trl.plots import plot_mask, selection_matrix
from neft_trl.report import summarize

BOTH = "mlp,attention"


def test_llama_map_has_q_k_v_rows_and_o_columns():
    neuron_map = build_neuron_map(make_model("llama"), targets=("mlp", "attention"))
    layer0 = {p.role: p for p in neuron_map if p.layer == 0}
    assert list(layer0) == ["q", "k", "v", "o", "up", "down"]
    # hidden 32, 4 heads of 8, 2 kv heads: q/o hold 32 neurons, k/v 16 (GQA); every vector holds hidden = 32
    assert [layer0[r].num_neurons for r in ("q", "k", "v", "o")] == [32, 16, 16, 32]
    assert all(layer0[r].is_input for r in "qkv") and not layer0["o"].is_input
    assert layer0["o"].neuron_dim == 1 and layer0["q"].neuron_dim == 0  # o: columns, q: rows of [out, in]
    mlp_only = build_neuron_map(make_model("llama"))
    assert neuron_map.num_candidates == mlp_only.num_candidates + 2 * (32 + 16 + 16 + 32)
    assert mlp_only.targets == ("mlp",) and neuron_map.targets == ("mlp", "attention")
    assert neuron_map.intermediate_size == 48  # the MLP's, not the attention width


def test_gpt2_fused_qkv_is_one_conv1d_projection():
    neuron_map = build_neuron_map(make_model("gpt2"), targets=BOTH)
    qkv, o = (next(p for p in neuron_map if p.layer == 0 and p.role == r) for r in ("qkv", "o"))
    assert qkv.name == "transformer.h.0.attn.c_attn" and o.name == "transformer.h.0.attn.c_proj"
    assert (qkv.num_neurons, qkv.params_per_neuron) == (96, 33)  # 3 x hidden rows, each with its bias element
    assert (o.num_neurons, o.params_per_neuron) == (32, 32)  # the output bias is shared: not a neuron's
    assert qkv.neuron_dim == 1 and o.neuron_dim == 0  # Conv1D stores [in, out]


def test_mlp_unit_ties_attention_projections_of_equal_width():
    groups = {g.key: [p.role for p in g.projections]
              for g in build_neuron_map(make_model("llama"), unit="mlp", targets=BOTH).groups if g.layer == 0}
    assert groups == {"model.layers.0.self_attn.q+o": ["q", "o"], "model.layers.0.self_attn.k+v": ["k", "v"],
                      "model.layers.0.mlp": ["up", "down"]}


def test_bad_targets_and_layouts_are_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="neuron_targets='mlp,attn'.*'mlp', 'attention'"):
        NeFTConfig(output_dir=str(tmp_path), neuron_targets="mlp,attn", report_to=[])
    assert NeFTConfig(output_dir=str(tmp_path), neuron_targets="attention, mlp", report_to=[]).targets == (
        "mlp", "attention")
    with pytest.raises(UsageError, match="attention_modules=.*must map 'q', 'k', 'v' and 'o'"):
        build_neuron_map(make_model("llama"), targets=BOTH, attention_modules={"q": "q_proj", "o": "o_proj"})

    class MLPOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.ModuleDict({"up_proj": nn.Linear(4, 8), "down_proj": nn.Linear(8, 4)})

    with pytest.raises(UsageError, match="no attention projections were found.*attention_modules"):
        build_neuron_map(MLPOnly(), targets=BOTH)
    custom = build_neuron_map(make_model("llama"), targets="attention",
                              attention_modules={"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"})
    assert {p.role for p in custom} == {"q", "k", "v", "o"}


def _train(tmp_path, arch, mode, **overrides):
    model = make_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = tiny_args(tmp_path, **{"neft_mode": mode, "neuron_targets": BOTH, "neuron_ratio": 0.3, **overrides})
    trainer = NeFTSFTTrainer(model, make_dataset(), selector="random", args=args, processing_class=make_tokenizer())
    trainer.train()
    return trainer, before


@pytest.mark.parametrize(("arch", "mode"), [("llama", "hooks"), ("llama", "delta"), ("gpt2", "hooks"),
                                            ("gpt2", "delta")])
def test_frozen_bits_stay_identical_and_selected_attention_neurons_move(tmp_path, arch, mode):
    trainer, before = _train(tmp_path, arch, mode, weight_decay=0.1)
    mask = trainer.neuron_mask
    attention = [p for p in trainer.neuron_map if p.is_attention]
    assert attention and all(mask.selected[p.name].any() for p in attention)
    if mode == "delta":
        assert all(trainer.model.state_dict()[n].equal(v) for n, v in before.items())  # the base never moves
        assert {p.name for p in attention} <= set(trainer.neuron_training.deltas)
        trainer.neuron_training.merge()  # then the weights differ from before exactly on the selected neurons
    assert_only_selected_changed(trainer, before)


def test_tied_attention_units_train_bit_exactly(tmp_path):
    trainer, before = _train(tmp_path, "llama", "hooks", neuron_unit="mlp", neuron_ratio=None, num_neurons=20)
    mask = trainer.neuron_mask
    for layer in (0, 1):
        q, o = (mask.selected[f"model.layers.{layer}.self_attn.{n}_proj"] for n in ("q", "o"))
        k, v = (mask.selected[f"model.layers.{layer}.self_attn.{n}_proj"] for n in ("k", "v"))
        assert torch.equal(q, o) and torch.equal(k, v)
    assert_only_selected_changed(trainer, before)


def test_per_role_scope_gives_every_role_the_same_share():
    neuron_map = build_neuron_map(make_model("llama"), targets=BOTH)
    scores = {g.key: torch.arange(g.size, dtype=torch.float32) * (1 + g.layer) for g in neuron_map.groups}
    mask = select_top(neuron_map, scores, Budget(neuron_ratio=0.25), 10**6, scope="per_role")
    per_role: dict[str, list[int]] = {}
    for p in neuron_map:
        per_role.setdefault(p.role, [0, 0])
        per_role[p.role][0] += int(mask.selected[p.name].sum())
        per_role[p.role][1] += p.num_neurons
    assert {role: chosen for role, (chosen, _) in per_role.items()} == {
        role: round(0.25 * total) for role, (_, total) in per_role.items()}
    pooled = select_top(neuron_map, scores, Budget(neuron_ratio=0.25), 10**6, scope="global")
    assert pooled.num_selected == mask.num_selected and pooled != mask  # same budget, other split


def test_4bit_delta_trains_attention_neurons_and_keeps_the_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from datasets import Dataset
    from test_quantized import CONFIGS, SENTENCE, _fixed_batch_loss

    path = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    args = tiny_args(tmp_path, selector="random", neuron_ratio=0.5, learning_rate=5e-2, max_steps=6,
                     neuron_targets=BOTH)
    trainer = NeFTSFTTrainer(str(path), Dataset.from_dict({"text": [SENTENCE] * 8}), args=args,
                             quantization_config=CONFIGS["nf4-double"]())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss_before = _fixed_batch_loss(trainer.model)
    trainer.train()
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())  # byte-identical base
    deltas = trainer.neuron_training.deltas
    assert {n for n in deltas if ".self_attn." in n} == {p.name for p in trainer.neuron_map if p.is_attention}
    assert all(d.weight.abs().sum() > 0 for d in deltas.values())
    assert _fixed_batch_loss(trainer.model) < loss_before - 0.05


def test_mask_save_load_rebuilds_the_attention_map(tmp_path):
    trainer, _ = _train(tmp_path, "llama", "delta", max_steps=1)
    path = trainer.neuron_mask.save(tmp_path / "mask")
    loaded = NeuronMask.load(path)
    assert loaded == trainer.neuron_mask and loaded.info == trainer.neuron_mask.info
    fresh = make_model("llama")
    rebuilt = neuron_map_for_mask(fresh, loaded)
    assert [p.name for p in rebuilt] == [p.name for p in trainer.neuron_map] and rebuilt.targets == ("mlp", "attention")
    handle = apply_neurons(fresh, loaded, mode="hooks")
    assert handle.trainable_parameter_count() == loaded.trainable_parameters
    with pytest.raises(UsageError, match="does not fit.*neuron_targets"):
        loaded.check_fits(build_neuron_map(make_model("llama")))  # an MLP-only map: the attention rows are absent


def test_report_and_plots_show_attention_roles(tmp_path):
    neuron_map = build_neuron_map(make_model("llama"), targets=BOTH)
    g = torch.Generator().manual_seed(0)
    scores = {group.key: torch.rand(group.size, generator=g) for group in neuron_map.groups}
    mask = select_top(neuron_map, scores, Budget(neuron_ratio=0.3), 10**6)
    summary = summarize(mask)
    assert summary.roles == ["up", "down", "q", "k", "v", "o"]
    expected_o = sum(int(mask.selected[f"model.layers.{i}.self_attn.o_proj"].sum()) for i in (0, 1))
    assert sum(summary.per_layer[layer]["o"] for layer in (0, 1)) == expected_o > 0
    assert "| layer | up | down | q | k | v | o |" in mask_markdown(mask)
    assert selection_matrix(mask, "k").shape == (2, 16)
    png = plot_mask(mask, tmp_path / "mask.png")
    assert png.stat().st_size > 1000


def mask_markdown(mask: NeuronMask) -> str:
    from neft_trl.report import neuron_report

    return neuron_report(mask).to_markdown()


@pytest.mark.parametrize(("selector", "kwargs"), [("cosine", {"probe_steps": 2}),
                                                  ("gradient", {"calibration_batches": 2}),
                                                  ("activation", {"calibration_batches": 2})])
@pytest.mark.parametrize("unit", ["vector", "mlp"])
def test_data_driven_selectors_score_attention_neurons(selector, kwargs, unit):
    from conftest import make_token_batches

    from neft_trl import select_neurons

    model = make_model("llama")
    mask = select_neurons(model, make_token_batches(2), selector, neuron_ratio=0.3, neuron_unit=unit,
                          neuron_targets=BOTH, show_progress=False, **kwargs)
    roles = {str(mask.info[n]["role"]) for n, t in mask.selected.items() if t.any()}
    assert {"q", "k", "v", "o"} & roles  # attention competes with the MLP in each layer's pool and wins some places
    assert mask.num_selected > 0 and set(summarize(mask).roles) == {"up", "down", "q", "k", "v", "o"}
