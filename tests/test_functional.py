"""The functional API: select_neurons -> apply_neurons -> any optimizer loop, without a Trainer."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, make_dataset, make_model, make_token_batches, make_tokenizer, tiny_args

from neft_trl import NeFTSFTTrainer, NeuronMask, apply_neurons, select_neurons
from neft_trl.training.delta_io import DELTA_FILENAME


def _train(model, mask, mode, steps=3, weight_decay=0.1):
    handle = apply_neurons(model, mask, mode)
    optimizer = handle.make_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=weight_decay)
    for batch in make_token_batches(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return handle


@pytest.mark.parametrize("mode", ["delta", "hooks"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_the_mask_trains_and_detach_restores_the_model(arch, mode):
    model = make_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mask = select_neurons(model, make_token_batches(2), "gradient", neuron_ratio=0.2, calibration_batches=2)
    handle = _train(model, mask, mode)
    merged = handle.merge()  # delta: folded into the weights; hooks: the weights already hold the training
    assert merged is model and not any(".neft_delta." in n for n, _ in model.named_parameters())
    for proj in handle.neuron_map:
        weight, old = proj.module.weight.detach(), before[f"{proj.name}.weight"]
        moved = (weight != old).any(dim=1 - proj.neuron_dim)
        selected = mask.selected[proj.name]
        assert not moved[~selected].any(), f"a frozen neuron of {proj.name} moved"
        assert moved[selected].all(), f"a selected neuron of {proj.name} did not move"
    trained = {f"{p.name}.weight" for p in handle.neuron_map} | {f"{p.name}.bias" for p in handle.neuron_map
                                                                   if p.trains_bias}
    for name, param in model.named_parameters():
        if name not in trained:
            assert torch.equal(param, before[name]), f"{name} changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # detach restored every flag


def test_detach_without_merge_gives_back_the_base_function():
    model = make_model("llama")
    batch = make_token_batches(1, seed=5)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    mask = select_neurons(model, None, "random", neuron_ratio=0.3, seed=1)
    handle = _train(model, mask, "delta")
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, expected)
        handle.detach()
        assert torch.equal(model(**batch).logits, expected)


def test_save_writes_mask_and_deltas(tmp_path):
    model = make_model("llama")
    mask = select_neurons(model, None, "random", num_neurons=12)
    _train(model, mask, "delta").save(tmp_path)
    assert NeuronMask.load(tmp_path) == mask and (tmp_path / DELTA_FILENAME).is_file()


def test_a_mask_from_another_model_names_the_shapes():
    mask = select_neurons(make_model("llama"), None, "random", num_neurons=5)
    with pytest.raises(ValueError, match="absent|vs"):
        apply_neurons(make_model("qwen2"), mask)


def test_the_default_keeps_the_same_share_in_every_layer():
    """Scores piled into one layer fill the paper's global pool with that layer; the default spreads them."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(10)
        model.model.layers[1].mlp.down_proj.weight.mul_(10)
    select = lambda **kw: select_neurons(model, make_token_batches(2), "gradient", neuron_ratio=0.25, **kw)  # noqa: E731
    default, pooled = select(), select(neuron_scope="global")
    assert default.metadata["neuron_scope"] == "per_layer"
    assert default.per_layer_counts() == {0: 24, 1: 24}
    assert pooled.metadata["neuron_scope"] == "global" and pooled.per_layer_counts().get(0, 0) < 12


def test_trainer_and_functional_api_train_the_same_weights(tmp_path):
    """One mechanism: the trainer's selection and training are the functional calls with the trainer's data."""
    args = tiny_args(tmp_path, selector="random", neuron_ratio=0.25, neft_mode="delta", max_steps=3,
                     learning_rate=1e-2, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
                     optim="adamw_torch")
    trainer = NeFTSFTTrainer(make_model("llama"), make_dataset(), args=args, processing_class=make_tokenizer())
    batches, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, *rest, **kwargs):  # the batches the run really trains on, in its order
        batch = {k: inputs[k].clone() for k in ("input_ids", "attention_mask", "labels")}
        # the loss's token count: transformers 4.57 counts labels before the shift (32 where 5.x counts 28)
        items = kwargs.get("num_items_in_batch")
        batches.append((batch, float(items) if items is not None else None))
        return compute_loss(model, inputs, *rest, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    assert len(batches) == 3

    model = make_model("llama")
    mask = select_neurons(model, None, "random", neuron_ratio=0.25, seed=args.seed)
    assert mask == trainer.neuron_mask
    handle = apply_neurons(model, mask, "delta")
    optimizer = handle.make_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    for batch, items in batches:
        shifted = float((batch["labels"][:, 1:] != -100).sum())  # the tokens the model's own mean is over
        (model(**batch).loss * (shifted / items if items else 1.0)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, delta in trainer.neuron_training.deltas.items():
        torch.testing.assert_close(handle.deltas[name].weight, delta.weight, rtol=0, atol=1e-6)
