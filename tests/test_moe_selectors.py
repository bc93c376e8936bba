"""Mixture-of-experts models: selectors score every routed expert from the tokens routed to it only."""

from __future__ import annotations

import pytest
import torch
from moe_fixtures import batches, make_moe, skip_without_fused_experts

from neft_trl.budget import Budget
from neft_trl.neurons import build_neuron_map
from neft_trl.selection import run_selector
from neft_trl.selectors.base import SelectionContext

skip_without_fused_experts()



def _without_expert(model, expert: int):
    """Route every token away from ``expert`` (forward hooks on the routers); returns the handles."""
    def reroute(module, args, out):
        logits_, scores, index = out
        return logits_, scores, torch.where(index == expert, (index + 1) % module.num_experts, index)
    return [layer.mlp.gate.register_forward_hook(reroute) for layer in model.model.layers]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("selector", ["activation", "gradient", "random"])
def test_selectors_score_every_expert_and_unrouted_experts_score_zero(arch, selector):
    model = make_moe(arch)
    neuron_map = build_neuron_map(model)
    handles = _without_expert(model, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    context = SelectionContext(model=model, neuron_map=neuron_map, budget=Budget.resolve(neuron_ratio=0.2),
                               batches=batches(), show_progress=False)
    kwargs = {"calibration_batches": 2} if selector != "random" else {}
    mask = run_selector(context, selector, kwargs)
    for h in handles:
        h.remove()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert mask.num_selected > 0 and mask.per_expert_counts()
    if selector != "random":
        for layer in mask.per_expert_counts().values():
            assert layer.get(3, 0) == 0  # never routed -> score 0 -> never kept under keep="highest"


def test_activation_scores_are_means_over_routed_real_tokens():
    from neft_trl.selectors.activation import ActivationSelector

    model = make_moe("mixtral")
    neuron_map = build_neuron_map(model)
    data = batches(1)
    experts = model.model.layers[0].mlp.experts
    seen = {}
    handle = experts.register_forward_hook(lambda m, args, out: seen.update(x=args[0], index=args[1]))
    context = SelectionContext(model=model, neuron_map=neuron_map, budget=Budget.resolve(neuron_ratio=0.2),
                               batches=data, show_progress=False)
    scores = ActivationSelector(calibration_batches=1).score(context)
    handle.remove()
    routed = (seen["index"] == 2).any(-1) & data[0]["attention_mask"].reshape(-1).bool()
    inter = experts.down_proj.shape[-1]
    expected = (seen["x"][routed] @ experts.gate_up_proj[2, inter:].t()).abs().mean(0)
    torch.testing.assert_close(scores["model.layers.0.mlp.experts.neft_experts.2.up"], expected.detach())


def test_cosine_probe_scores_routed_experts_without_touching_the_model():
    model = make_moe("mixtral")
    neuron_map = build_neuron_map(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    context = SelectionContext(model=model, neuron_map=neuron_map, budget=Budget.resolve(neuron_ratio=0.2),
                               batches=batches(), show_progress=False)
    mask = run_selector(context, "cosine", {"probe_steps": 2, "probe_learning_rate": 1e-2})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert sum(sum(c.values()) for c in mask.per_expert_counts().values()) == mask.num_selected > 0
