"""The built-in selectors on tiny models: counts, determinism, known answers, and an untouched model.

Known answers come from outside the selector code: a neuron made to fire 50x harder (activation), autograd's
own weight gradients (gradient), so each test fails if the selector scores the wrong row, column or token.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_dataset, make_model, make_tokenizer, tiny_args

from neft_trl import NeFTSFTTrainer, SelectionContext, build_neuron_map
from neft_trl.budget import Budget
from neft_trl.selection import run_selector
from neft_trl.selectors.activation import ActivationSelector
from neft_trl.selectors.gradient import GradientSelector

SELECTORS = ["random", "activation", "gradient", "cosine"]
#: the dimension of the STORED weight that a neuron's vector runs along (summed over per neuron)
VECTOR_DIM = {"up_proj": 1, "gate_proj": 1, "down_proj": 0, "c_fc": 0, "c_proj": 1}


def make_batches(texts: list[str], padded: bool = True) -> list[dict[str, torch.Tensor]]:
    """Collated batches with labels (-100 on padding), as a trainer's collator makes them."""
    tok = make_tokenizer()
    texts = list(texts)
    groups = [texts] if padded else [[t] for t in texts]
    out = []
    for group in groups:
        enc = tok(group, padding=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels})
    return out


def context(model, batches=None, unit="vector", num_neurons=4, seed=0) -> SelectionContext:
    return SelectionContext(model=model, neuron_map=build_neuron_map(model, unit), budget=Budget.resolve(
        num_neurons=num_neurons), seed=seed, batches=batches, show_progress=False)


def trainer(tmp_path, arch, selector, **overrides):
    args = tiny_args(tmp_path, **{"num_neurons": 7, **overrides})
    return NeFTSFTTrainer(make_model(arch), make_dataset(), selector=selector, args=args,
                          processing_class=make_tokenizer())


def hooks(model):
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, hooks(model))


def assert_untouched(model, before):
    weights, flags, hook_counts = before
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), f"{name} changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert hooks(model) == hook_counts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("selector", SELECTORS)
def test_builtin_counts_determinism_and_untouched_model(tmp_path, selector, arch):
    first = trainer(tmp_path / "a", arch, selector)
    before = snapshot(first.model)
    mask = first.select_neurons()
    # 7 candidates of the default unit, an MLP channel: 7 up rows and the 7 matching down columns
    assert mask.num_selected == 2 * 7 and sum(mask.per_layer_counts().values()) == 2 * 7
    assert mask.metadata["selector"] == selector and mask.metadata["selector_package"] == "neft-trl"
    assert_untouched(first.model, before)
    assert first.optimizer is None
    assert trainer(tmp_path / "b", arch, selector).select_neurons() == mask  # same seed, same neurons


@pytest.mark.parametrize("selector", SELECTORS)
def test_mlp_units_select_whole_units(tmp_path, selector):
    mask = trainer(tmp_path, "llama", selector, neuron_unit="mlp", num_neurons=5).select_neurons()
    per_layer = [(mask.selected[f"model.layers.{i}.mlp.up_proj"], mask.selected[f"model.layers.{i}.mlp.down_proj"])
                 for i in range(2)]
    assert all(torch.equal(up, down) for up, down in per_layer)  # row n of up and column n of down together
    assert sum(int(up.sum()) for up, _ in per_layer) == 5


def test_random_depends_on_the_seed_only(tmp_path):
    masks = [run_selector(context(make_model(), num_neurons=20, seed=s), "random") for s in (0, 0, 1)]
    assert masks[0] == masks[1] and masks[0] != masks[2]


# -- activation ----------------------------------------------------------------------------------------

LOUD = {"llama": ("model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"),
        "gpt2": ("transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj")}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_activation_picks_the_neuron_made_to_fire_hardest(arch):
    model = make_model(arch)
    up_name, down_name = LOUD[arch]
    modules = dict(model.named_modules())
    with torch.no_grad():
        modules[up_name].weight.select(1 - VECTOR_DIM[up_name.rsplit(".", 1)[1]], 9).mul_(50)  # in-neuron 9
    batches = make_batches(make_dataset(8)["text"])
    mask = run_selector(context(model, batches, num_neurons=2), "activation", scope="global")  # both in one layer
    # its own output (the in-neuron) and the post-nonlinearity input of down (the out-neuron) both win
    assert {n: mask.indices(n).tolist() for n in mask.selected if mask.indices(n).numel()} == {
        up_name: [9], down_name: [9]}


def test_activation_ignores_padding_tokens():
    model = make_model("llama")
    texts = ["the cat sat", "a big red dog ran under the blue tree"]
    padded = ActivationSelector(calibration_batches=1).score(context(model, make_batches(texts)))
    separate = ActivationSelector(calibration_batches=2).score(context(model, make_batches(texts, padded=False)))
    for key, value in padded.items():
        torch.testing.assert_close(value, separate[key], rtol=1e-5, atol=1e-7)


# -- gradient ------------------------------------------------------------------------------------------

def autograd_importance(model, batches, importance):
    """The reference: real weight gradients (every parameter trainable), per neuron, averaged over batches."""
    model.eval()
    neuron_map = build_neuron_map(model)
    totals = {p.name: 0 for p in neuron_map}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for proj in neuron_map:
            weight, bias = proj.module.weight, proj.module.bias
            dim = VECTOR_DIM[proj.name.rsplit(".", 1)[1]]
            if importance == "taylor":
                value = (weight * weight.grad).sum(dim)
                value = value + bias * bias.grad if proj.is_input and bias is not None else value
                value = value.abs()
            else:
                value = weight.grad.square().sum(dim)
                value = value + bias.grad.square() if proj.is_input and bias is not None else value
                value = value.sqrt()
            totals[proj.name] = totals[proj.name] + value.detach() / len(batches)
    model.zero_grad(set_to_none=True)
    return totals


@pytest.mark.parametrize("importance", ["taylor", "norm"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_scores_equal_autograd_weight_gradients(arch, importance):
    model = make_model(arch)
    texts = make_dataset(8)["text"]
    batches = [make_batches(texts[:4])[0], make_batches(texts[4:])[0]]
    scores = GradientSelector(calibration_batches=2, importance=importance).score(context(model, batches))
    expected = autograd_importance(model, batches, importance)
    for name, value in expected.items():
        torch.testing.assert_close(scores[name], value, rtol=1e-4, atol=1e-7)


def test_gradient_works_when_mlp_weights_do_not_require_grad():
    model = make_model("llama")
    batches = make_batches(make_dataset(4)["text"])
    expected = GradientSelector(calibration_batches=1).score(context(model, batches))
    for name, param in model.named_parameters():
        param.requires_grad_("mlp" not in name)
    before = snapshot(model)
    scores = GradientSelector(calibration_batches=1).score(context(model, batches))
    assert_untouched(model, before)
    for key, value in expected.items():
        assert value.abs().sum() > 0
        torch.testing.assert_close(scores[key], value)
    model.requires_grad_(False)  # a fully frozen model still gets activation gradients
    scores = GradientSelector(calibration_batches=1).score(context(model, batches))
    torch.testing.assert_close(scores, expected)
    assert not any(p.requires_grad for p in model.parameters())


def test_selector_kwargs_are_checked():
    with pytest.raises(ValueError, match="importance='hessian' is not one of"):
        GradientSelector(importance="hessian")
    with pytest.raises(ValueError, match="calibration_batches must be a positive integer"):
        ActivationSelector(calibration_batches=0)
    with pytest.raises(ValueError, match="needs training data"):
        run_selector(context(make_model()), "activation")
