"""The plugin's own tests, as its author would ship them: scores, discovery, and a short NeFT run."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from neft_selector_magnitude import MagnitudeSelector
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import neft_trl
from neft_trl import NeFTConfig, NeFTSFTTrainer, build_neuron_map
from neft_trl.budget import Budget
from neft_trl.selection import run_selector

WORDS = "the cat sat on a mat and ran to the red log".split()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
    return LlamaForCausalLM(config)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def test_the_plugin_is_discovered_through_its_entry_point():
    info = neft_trl.available_selectors()["magnitude"]
    assert info.selector_class is MagnitudeSelector
    assert info.package == "neft-selector-magnitude"


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_scores_are_the_norms_of_the_neuron_vectors(p):
    model = tiny_llama()
    neuron_map = build_neuron_map(model)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5] *= 10  # an in-neuron (row)
        mlp.down_proj.weight[:, 7] *= 10  # an out-neuron (column)
    context = neft_trl.SelectionContext(model=model, neuron_map=neuron_map, budget=Budget.resolve(num_neurons=2))
    scores = MagnitudeSelector(p=p).score(context)
    up, down = "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"
    assert torch.allclose(scores[up], mlp.up_proj.weight.norm(p=p, dim=1))
    assert torch.allclose(scores[down], mlp.down_proj.weight.norm(p=p, dim=0))
    mask = run_selector(context, "magnitude", scope="global")  # both neurons sit in layer 1: rank across layers
    assert mask.indices(up).tolist() == [5] and mask.indices(down).tolist() == [7]


def test_a_neft_run_with_the_plugin_trains_only_the_selected_neurons(tmp_path):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = Dataset.from_dict({"text": [" ".join(WORDS[i:] + WORDS[:i]) for i in range(8)]})
    args = NeFTConfig(output_dir=str(tmp_path), num_neurons=4, max_steps=2, learning_rate=1e-2, report_to=[],
                      use_cpu=True, per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)
    trainer = NeFTSFTTrainer(model, data, selector="magnitude", args=args, processing_class=tokenizer())
    trainer.train()
    mask = trainer.neuron_mask
    # 4 candidates of the default unit, an MLP channel: an up row and a down column each
    assert mask.metadata["selector"] == "magnitude" and mask.num_selected == 2 * 4
    model = trainer.neuron_training.merge()  # the default (delta) mode: fold the trained deltas into the weights
    for name, selected in mask.selected.items():
        weight = dict(model.named_parameters())[f"{name}.weight"]
        dim = 0 if "up_proj" in name else 1
        changed = (weight != before[f"{name}.weight"]).any(dim=1 - dim)
        assert torch.equal(changed, selected), name
