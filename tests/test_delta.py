"""Delta mode in full precision: the delta layer's arithmetic, equivalence with hooks mode, save/load/merge,
resume, and the errors for a delta that belongs to another model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_dataset, make_model, make_tokenizer, tiny_args
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from neft_trl import NeFTSFTTrainer, load_neuron_delta, merge_neuron_delta
from neft_trl.training.delta_io import DELTA_CONFIG_FILENAME, DELTA_FILENAME, read_neuron_delta, save_neuron_delta
from neft_trl.training.delta_layer import NeuronDelta, attach_delta, attached_deltas, detach_delta, has_delta


def _train(tmp_path, model, mode, **overrides):
    values = dict(selector="random", neuron_ratio=0.25, neft_mode=mode, weight_decay=0.0)
    args = tiny_args(tmp_path, **{**values, **overrides})
    trainer = NeFTSFTTrainer(model, make_dataset(), args=args, processing_class=make_tokenizer())
    trainer.train()
    return trainer


def _logits(model, seed=1):
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("layer_class", ["linear", "conv1d"])
@pytest.mark.parametrize("is_input", [True, False])
def test_delta_output_equals_dense_weight_update(layer_class, is_input):
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5) if layer_class == "linear" else Conv1D(5, 6)
    index = torch.tensor([0, 3]) if is_input else torch.tensor([1, 2, 5])
    delta = NeuronDelta(index, is_input, 6, 5, with_bias=is_input)
    torch.nn.init.normal_(delta.weight)
    if delta.bias is not None:
        torch.nn.init.normal_(delta.bias)
    x = torch.randn(3, 4, 6)
    weight = (layer.weight.t() if layer_class == "conv1d" else layer.weight).detach().clone()
    bias = layer.bias.detach().clone()
    expected_bias = bias.index_add(0, index, delta.bias.detach()) if is_input else bias
    expected = torch.nn.functional.linear(x, weight + delta.dense(), expected_bias)

    attach_delta(layer, delta)
    torch.testing.assert_close(layer(x), expected)
    detach_delta(layer)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, bias))  # base function restored
    delta.merge_into(layer)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("is_input", [True, False])
def test_a_delta_over_every_neuron_adds_exactly_what_the_gather_scatter_adds(is_input):
    """The cosine probe's full-size delta takes NeuronDelta's plain ``x D^T`` path: bit-identical to the general one."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    full = NeuronDelta(torch.arange(5 if is_input else 6), is_input, 6, 5)
    part = NeuronDelta(torch.tensor([0, 2, 4]), is_input, 6, 5)
    assert full.covers_all and not part.covers_all
    torch.nn.init.normal_(full.weight)
    x = torch.randn(3, 4, 6)
    out = layer(x)
    general = (out.index_add(-1, full.index, torch.nn.functional.linear(x, full.weight)) if is_input
               else out + torch.nn.functional.linear(x.index_select(-1, full.index), full.weight))
    assert torch.equal(full(x, out), general)
    with pytest.raises(ZeroDivisionError), attached_deltas({layer: full}):
        assert torch.equal(layer(x), general)
        raise ZeroDivisionError
    assert not has_delta(layer) and not layer._forward_hooks and torch.equal(layer(x), out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooks_and_delta_train_the_same_weights(tmp_path, arch):
    hooks = _train(tmp_path / "hooks", make_model(arch), "hooks")
    delta = _train(tmp_path / "delta", make_model(arch), "delta")
    assert delta.neuron_mask == hooks.neuron_mask
    delta.save_model(str(tmp_path / "saved"))
    merged = merge_neuron_delta(make_model(arch), tmp_path / "saved")
    base = make_model(arch).state_dict()
    trained = hooks.model.state_dict()
    changed = 0
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += int(not torch.equal(value, base[name]))
    assert changed >= 2 * 2  # up and down projections of both layers moved
    # The conv1d (GPT-2 c_fc) in-neurons own their bias: it trained in both modes.
    if arch == "gpt2":
        assert not torch.equal(merged.transformer.h[0].mlp.c_fc.bias, base["transformer.h.0.mlp.c_fc.bias"])


def test_delta_mode_freezes_base_and_optimizes_only_deltas(tmp_path):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _train(tmp_path, model, "delta", weight_decay=0.1)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in optimized]
    assert names and all(".neft_delta." in n for n in names)
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == (
        trainer.neuron_mask.trainable_parameters
    )
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), name  # bit-exact, weight decay included
    assert any(d.weight.abs().sum() > 0 for d in trainer.neuron_training.deltas.values())
    decayed = set(trainer.get_decay_parameter_names(model))
    assert {n for n in names if n.endswith("neft_delta.weight")} <= decayed  # decay pulls toward the base
    assert all(d.weight.dtype == torch.float32 for d in trainer.neuron_training.deltas.values())


def test_saved_delta_loads_and_merges_to_the_trained_model(tmp_path):
    trainer = _train(tmp_path, make_model("llama"), "delta")
    out = tmp_path / "saved"
    base = {n: p.clone() for n, p in trainer.model.named_parameters() if ".neft_delta." not in n}
    trainer.save_model(str(out))
    expected = _logits(trainer.model)
    config = json.loads((out / DELTA_CONFIG_FILENAME).read_text())
    assert config["neft_mode"] == "delta" and config["selector"] == "random" and "neuron_ratio" in config["budget"]
    assert (out / "tokenizer.json").is_file()  # the tokenizer beside them, as SFTTrainer does
    # full precision: a plain merged checkpoint too, written without changing the in-memory base weights
    for name, param in trainer.model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any(".neft_delta." in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-5, atol=1e-5)

    loaded = load_neuron_delta(make_model("llama"), out)
    torch.testing.assert_close(_logits(loaded), expected)

    merged = merge_neuron_delta(make_model("llama"), out)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="already carries neuron deltas"):
        merge_neuron_delta(trainer.model, out)
    trainer.neuron_training.detach()
    assert not any(".neft_delta." in n for n, _ in trainer.model.named_parameters())
    torch.testing.assert_close(_logits(merge_neuron_delta(trainer.model, out)), expected, rtol=1e-5, atol=1e-5)


def test_delta_for_another_model_is_a_clear_error(tmp_path):
    trainer = _train(tmp_path, make_model("llama"), "delta")
    trainer.save_model(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"different model.*\[out=48, in=32\].*\[out=40, in=32\]"):
        load_neuron_delta(make_model("qwen2"), tmp_path / "saved")
    with pytest.raises(ValueError, match="absent from this model"):
        merge_neuron_delta(make_model("gpt2"), tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match=DELTA_FILENAME):
        load_neuron_delta(make_model("llama"), tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a valid neft_trl neuron delta"):
        read_neuron_delta(tmp_path / "bad.safetensors")


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    delta = NeuronDelta(torch.tensor([1, 4]), True, 3, 6)
    delta.weight.data.fill_(2.0)
    save_neuron_delta({"proj": delta}, tmp_path, {"neft_mode": "delta"})

    def killed(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 7)  # a partial write, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr("neft_trl.training.delta_io.save_file", killed)
    delta.weight.data.fill_(5.0)
    with pytest.raises(KeyboardInterrupt):
        save_neuron_delta({"proj": delta}, tmp_path, {"neft_mode": "delta"})
    saved, _ = read_neuron_delta(tmp_path)
    assert torch.equal(saved["proj"].weight, torch.full((2, 3), 2.0))
    assert {p.name for p in tmp_path.iterdir()} == {DELTA_CONFIG_FILENAME, DELTA_FILENAME}  # no temp file left


def test_resume_gives_the_same_deltas_as_an_uninterrupted_run(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, weight_decay=0.05)
    full = _train(tmp_path / "full", make_model("llama"), "delta", **common)
    resumed_args = tiny_args(tmp_path / "full", selector="random", neuron_ratio=0.25, neft_mode="delta", **common)
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert (checkpoint / DELTA_FILENAME).is_file() and not (checkpoint / "model.safetensors").exists()
    resumed = NeFTSFTTrainer(make_model("llama"), make_dataset(), args=resumed_args, processing_class=make_tokenizer())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4 and resumed.neuron_mask == full.neuron_mask
    for name, delta in full.neuron_training.deltas.items():
        torch.testing.assert_close(resumed.neuron_training.deltas[name].weight, delta.weight, rtol=0, atol=1e-7)


def test_auto_mode_picks_delta_in_full_precision(tmp_path):
    args = tiny_args(tmp_path, selector="random")
    trainer = NeFTSFTTrainer(make_model("llama"), make_dataset(), args=args, processing_class=make_tokenizer())
    assert trainer.neft_mode == "delta"


def test_load_best_model_at_end_loads_the_best_deltas(tmp_path):
    args = tiny_args(tmp_path, selector="random", neuron_ratio=0.25, neft_mode="delta", max_steps=4,
                     save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer = NeFTSFTTrainer(make_model("llama"), make_dataset(), eval_dataset=make_dataset(8, seed=1), args=args,
                             processing_class=make_tokenizer())
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")  # the highest eval loss is "best" here: not the final deltas
    saved, _ = read_neuron_delta(best)
    for name, delta in trainer.neuron_training.deltas.items():
        assert torch.equal(delta.weight.detach().cpu(), saved[name].weight)
