"""The memory estimate: byte accounting that matches what selection and training really hold."""

from __future__ import annotations

import torch
from conftest import make_dataset, make_model
from test_selectors import context, make_batches

from neft_trl import apply_neurons, build_neuron_map
from neft_trl.budget import Budget
from neft_trl.cli import main
from neft_trl.estimate import advice_if_too_big, estimate_lora, estimate_neft, lora_parameters_per_rank
from neft_trl.selection import run_selector


def _optimizer_bytes(optimizer):
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)  # AdamW's scalar `step` counters are not state memory


def test_delta_training_holds_exactly_the_estimated_bytes():
    model = make_model("llama")
    neuron_map = build_neuron_map(model)
    budget = Budget.resolve(neuron_ratio=0.25)
    estimate = estimate_neft(model, neuron_map, budget, "random", "delta")
    mask = run_selector(context(model, num_neurons=48), "random")
    handle = apply_neurons(model, mask, "delta")
    optimizer = handle.make_optimizer(torch.optim.AdamW, lr=1e-3)
    batch = make_batches(list(make_dataset(4)["text"]))[0]
    model(**batch).loss.backward()
    optimizer.step()
    params = [p for _, p in handle.named_trainable_parameters()]
    held = sum(p.numel() * 4 for p in params) + sum(p.grad.numel() * 4 for p in params) + _optimizer_bytes(optimizer)
    assert held == sum(estimate.training.values()) - 0 and estimate.trainable_parameters == mask.trainable_parameters


def test_hooks_training_holds_full_size_state_and_lora_is_sized_by_rank():
    model = make_model("llama")
    neuron_map = build_neuron_map(model)
    estimate = estimate_neft(model, neuron_map, Budget.resolve(neuron_ratio=0.25), "random", "hooks")
    mask = run_selector(context(model, num_neurons=48), "random")
    handle = apply_neurons(model, mask, "hooks")
    optimizer = handle.make_optimizer(torch.optim.AdamW, lr=1e-3)
    model(**make_batches(list(make_dataset(4)["text"]))[0]).loss.backward()
    optimizer.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for _, p in handle.named_trainable_parameters())
    assert grads + _optimizer_bytes(optimizer) == sum(estimate.training.values())
    lora = estimate_lora(model, estimate.trainable_parameters)
    rank = int(lora.method.removeprefix("lora r"))
    assert lora.trainable_parameters == rank * lora_parameters_per_rank(model)


def test_sketch_probe_state_matches_its_estimate_and_stays_under_the_training_bound():
    model = make_model("llama")
    neuron_map = build_neuron_map(model)
    estimate = estimate_neft(model, neuron_map, Budget.resolve(neuron_ratio=0.25), "cosine", "delta",
                             sketch_dim=16)
    mask = run_selector(context(model, make_batches(list(make_dataset(4)["text"])), num_neurons=48), "cosine",
                        {"probe_steps": 1, "sketch_dim": 16})
    persistent = {k: v for k, v in estimate.selection.items() if "transient" not in k}
    assert int(mask.metadata["probe_state_bytes"]) == sum(persistent.values())


def test_advice_names_settings_that_fit():
    model = make_model("llama")
    neuron_map = build_neuron_map(model)
    estimate = estimate_neft(model, neuron_map, Budget.resolve(neuron_ratio=0.25), "cosine", "hooks", probe="full")
    advice = advice_if_too_big(estimate, 1000, 10_000, "hooks", "full")
    assert "'probe': 'sketch'" in advice and "neft_mode='delta'" in advice and "param_ratio <=" in advice
    assert advice_if_too_big(estimate, 10**12, 10_000, "hooks", "full") is None


def test_cli_estimate_from_a_config_folder(tmp_path, capsys):
    make_model("llama").config.save_pretrained(tmp_path)
    assert main(["estimate", str(tmp_path), "--neuron_ratio", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "peak / LoRA's" in out and "lora r" in out
    assert main(["estimate", str(tmp_path / "missing")]) == 2
