"""Mixture-of-experts models: the neuron map over routed experts, training and masks (fused 3-D experts).

The map covers every expert and keeps the model's function, both training modes keep every other value
bit-identical, hooks == delta at weight decay 0, merging reproduces the logits, and masks carry the expert
dimension. Selectors: ``test_moe_selectors.py``; the trainer and saved deltas: ``test_moe_trainer.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from moe_fixtures import MOE, TRAINED, logits, make_moe, random_mask, skip_without_fused_experts, train

from neft_trl.budget import Budget, select_top
from neft_trl.experts import is_expert_view
from neft_trl.layers import parameter_count
from neft_trl.mask import NeuronMask
from neft_trl.neurons import build_neuron_map
from neft_trl.training import GradientMaskTraining
from neft_trl.training.delta import DeltaTraining

skip_without_fused_experts()


@pytest.mark.parametrize("arch", list(MOE))
def test_map_covers_every_expert_and_keeps_the_function(arch):
    model = make_moe(arch)
    before = logits(model)
    neuron_map = build_neuron_map(model, include_gate=True)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-6)  # now computed through the views
    assert neuron_map.num_layers == 2 and neuron_map.num_experts == 4
    routed = [p for p in neuron_map if p.expert is not None]
    assert len(routed) == 2 * 4 * 3 and all(is_expert_view(p.module) for p in routed)
    shared = [p.name for p in neuron_map if p.expert is None]
    assert shared == ([f"model.layers.{i}.mlp.shared_expert.{r}_proj" for i in range(2) for r in ("up", "gate", "down")]
                      if arch == "qwen2_moe" else [])
    experts = model.model.layers[1].mlp.experts
    view = neuron_map.by_name["model.layers.1.mlp.experts.neft_experts.3.up"].module
    inter = experts.down_proj.shape[-1]
    assert torch.equal(view.weight, experts.gate_up_proj[3, inter:]) and view.weight.data_ptr() == \
        experts.gate_up_proj[3, inter:].data_ptr()  # a view of the fused weight, not a copy
    per_expert = inter * 3 * 2 * 4
    assert neuron_map.num_candidates == per_expert + (40 * 3 * 2 if arch == "qwen2_moe" else 0)
    assert not any("gate.weight" in p.name for p in neuron_map)  # the router is never a candidate


def test_unsupported_fused_layout_is_an_error_naming_the_flag():
    model = make_moe("mixtral")
    model.model.layers[0].mlp.experts.has_bias = True
    with pytest.raises(ValueError, match="has_bias"):
        build_neuron_map(model)


def test_expert_weights_in_an_unknown_layout_are_not_left_out_silently():
    model = make_moe("qwen2_moe")
    model.model.layers[0].mlp.register_parameter("expert_w13", torch.nn.Parameter(torch.zeros(4, 8, 32)))
    with pytest.raises(ValueError, match="expert_w13"):
        build_neuron_map(model)


@pytest.mark.parametrize("arch", TRAINED)
@pytest.mark.parametrize("mode", ["hooks", "delta"])
def test_training_moves_only_selected_expert_slices(arch, mode):
    model = make_moe(arch)
    neuron_map = build_neuron_map(model, include_gate=True)
    mask = random_mask(neuron_map, model)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    training = (GradientMaskTraining if mode == "hooks" else DeltaTraining)(model, neuron_map, mask)
    train(model, training, weight_decay=0.1)
    if mode == "delta":
        deltas = training.deltas
        training.detach()  # forgets its deltas: merge the ones it trained
        for name, delta in deltas.items():
            delta.merge_into(neuron_map.by_name[name].module)
    changed_views = 0
    for proj in neuron_map:
        if proj.expert is None:
            continue
        param_name = next(n for n, p in model.named_parameters() if p is proj.module.fused_parameter)
        before = original[param_name][proj.expert, proj.module.rows]
        after = proj.module.weight.detach()
        keep = mask.selected[proj.name]
        if not proj.is_input:
            before, after = before.t(), after.t()
        assert torch.equal(after[~keep], before[~keep]), proj.name  # frozen neurons bit-identical
        changed_views += int(not torch.equal(after[keep], before[keep]))
    assert changed_views > len([p for p in neuron_map if p.expert is not None]) // 2
    fused_names = {n for n, p in model.named_parameters() if p.ndim == 3}
    trained_dense = {f"{p.name}.weight" for p in neuron_map if p.expert is None and mask.selected[p.name].any()}
    for name, value in original.items():
        if name not in fused_names and name not in trained_dense:
            assert torch.equal(dict(model.named_parameters())[name], value), name  # router, attention, norms...
    if arch == "qwen2_moe":  # the shared expert trains as an ordinary MLP
        assert any(not torch.equal(dict(model.named_parameters())[n], original[n]) for n in trained_dense)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_hooks_equal_delta_at_weight_decay_zero_and_merge_reproduces_logits(arch):
    hooked, deltaed = make_moe(arch), make_moe(arch)
    map_h, map_d = build_neuron_map(hooked), build_neuron_map(deltaed)
    mask = random_mask(map_h, hooked)
    train(hooked, GradientMaskTraining(hooked, map_h, mask))
    training = DeltaTraining(deltaed, map_d, mask)
    train(deltaed, training)
    with_delta = logits(deltaed)
    deltas = training.deltas
    training.detach()
    before_merge = logits(deltaed)
    for name, delta in deltas.items():
        delta.merge_into(map_d.by_name[name].module)
    merged = logits(deltaed)
    assert (with_delta - before_merge).abs().max() > 1e-3  # the deltas did something
    torch.testing.assert_close(merged, with_delta, rtol=0, atol=1e-5)
    for (name, p_h), p_d in zip(hooked.named_parameters(), deltaed.parameters(), strict=True):
        torch.testing.assert_close(p_d, p_h, rtol=0, atol=1e-6, msg=name)


def test_mask_keeps_the_expert_dimension_and_refuses_another_expert_count(tmp_path):
    model = make_moe("mixtral")
    neuron_map = build_neuron_map(model)
    mask = random_mask(neuron_map, model)
    loaded = NeuronMask.load(mask.save(tmp_path))
    assert loaded == mask and loaded.metadata["num_experts"] == "4"
    counts = loaded.per_expert_counts()
    assert sorted(counts) == [0, 1] and all(sorted(c) == [0, 1, 2, 3] for c in counts.values())
    assert sum(sum(c.values()) for c in counts.values()) == mask.num_selected
    other = build_neuron_map(make_moe("mixtral", experts=8))
    with pytest.raises(ValueError, match=r"(?s)4 experts per layer.*8 experts per layer"):
        loaded.check_fits(other)


def test_per_expert_scope_gives_every_expert_the_same_share():
    model = make_moe("qwen2_moe")
    neuron_map = build_neuron_map(model)
    scores = {g.key: torch.arange(g.size, dtype=torch.float) * (1 + int(g.expert == 0)) for g in neuron_map.groups}
    mask = select_top(neuron_map, scores, Budget.resolve(neuron_ratio=0.25), parameter_count(model),
                      keep="highest", scope="per_expert")
    counts = mask.per_expert_counts()
    assert all(c == {e: 16 * 2 // 4 for e in range(4)} for c in counts.values())
    shared = [n for n in mask.selected if "shared_expert" in n]
    assert all(mask.selected[n].sum() == 10 for n in shared)  # 25% of 40 in the shared expert's own pool
    with pytest.raises(ValueError, match="per_expert"):
        select_top(build_neuron_map(make_moe_dense()), {}, Budget.resolve(neuron_ratio=0.1), 1000,
                   scope="per_expert")


def make_moe_dense():
    from conftest import make_model

    return make_model("llama")



def test_copy_of_a_mapped_model_still_computes_through_its_own_views():
    model = make_moe("olmoe")
    build_neuron_map(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone), logits(model), rtol=0, atol=0)
    with torch.no_grad():
        clone.model.layers[0].mlp.experts.down_proj.zero_()
    assert not torch.equal(logits(clone), logits(model))
