"""Mixture-of-experts models: neurons inside routed experts (fused 3-D experts of transformers 5).

Tiny random Mixtral, Qwen2-MoE (with a shared expert), Qwen3-MoE and OLMoE: the map covers every expert,
both training modes keep every other value bit-identical, hooks == delta at weight decay 0, merging
reproduces the logits, selectors see routed tokens only, and masks carry the expert dimension.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402

from neft_trl.budget import Budget, select_top
from neft_trl.experts import is_expert_view, is_fused_experts
from neft_trl.layers import parameter_count
from neft_trl.mask import NeuronMask
from neft_trl.neurons import build_neuron_map
from neft_trl.selection import run_selector
from neft_trl.selectors.base import SelectionContext
from neft_trl.training import GradientMaskTraining
from neft_trl.training.delta import DeltaTraining

COMMON = dict(vocab_size=64, pad_token_id=0, eos_token_id=2, bos_token_id=2, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
MOE = {
    "mixtral": lambda e: MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=e, num_experts_per_tok=2),
    "qwen2_moe": lambda e: Qwen2MoeConfig(**COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=40,
                                          num_experts=e, num_experts_per_tok=2, decoder_sparse_step=1),
    "qwen3_moe": lambda e: Qwen3MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=e, num_experts_per_tok=2,
                                          decoder_sparse_step=1, head_dim=8),
    "olmoe": lambda e: OlmoeConfig(**COMMON, intermediate_size=20, num_experts=e, num_experts_per_tok=2),
}
TRAINED = ["mixtral", "qwen2_moe", "olmoe"]


def make_moe(arch: str, experts: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(MOE[arch](experts)).float()


if not any(is_fused_experts(m) for m in make_moe("mixtral").modules()):
    pytest.skip("this transformers stores experts as per-expert nn.Linear (4.x), not fused 3-D parameters: "
                "see test_moe_per_expert_linear.py", allow_module_level=True)


def batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # padding, which selectors must not count
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def random_mask(neuron_map, model, ratio: float = 0.3, seed: int = 0) -> NeuronMask:
    g = torch.Generator().manual_seed(seed)
    scores = {grp.key: torch.rand(grp.size, generator=g) for grp in neuron_map.groups}
    return select_top(neuron_map, scores, Budget.resolve(neuron_ratio=ratio), parameter_count(model))


def train(model, training, steps: int = 3, weight_decay: float = 0.0, accumulation: int = 2) -> None:
    training.attach()
    params = [p for p in model.parameters() if p.requires_grad]
    names = training.no_decay_parameter_names()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n not in names]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n in names]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
    training.install_weight_decay(optimizer, weight_decay)
    model.train()
    data = batches(steps * accumulation)
    for step in range(steps):
        for batch in data[step * accumulation:(step + 1) * accumulation]:
            (model(**batch).loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        optimizer.zero_grad()


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batches(1, seed=7)[0]["input_ids"]).logits


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


def test_copy_of_a_mapped_model_still_computes_through_its_own_views():
    model = make_moe("olmoe")
    build_neuron_map(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone), logits(model), rtol=0, atol=0)
    with torch.no_grad():
        clone.model.layers[0].mlp.experts.down_proj.zero_()
    assert not torch.equal(logits(clone), logits(model))


def test_bitsandbytes_leaves_fused_experts_unquantized_which_is_a_clear_error(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    make_moe("mixtral").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert type(model.model.layers[0].mlp.experts.gate_up_proj).__name__ == "Parameter"  # bnb skipped it
    with pytest.raises(ValueError, match=r"routed experts \(model\.layers\.0\.mlp\.experts\.gate_up_proj.*without "
                                         r"quantization_config"):
        build_neuron_map(model)


@pytest.mark.parametrize("mode", ["hooks", "delta"])
def test_trainer_selects_and_trains_expert_neurons(tmp_path, mode):
    from conftest import make_dataset, make_tokenizer, tiny_args

    from neft_trl import NeFTSFTTrainer

    model = make_moe("qwen2_moe")
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    args = tiny_args(tmp_path, selector="activation", selector_kwargs={"calibration_batches": 2},
                     neuron_ratio=0.2, neft_mode=mode, neuron_scope="per_expert", save_strategy="no")
    trainer = NeFTSFTTrainer(model, make_dataset(), args=args, processing_class=make_tokenizer())
    trainer.train()
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)  # the router never trains
    report = trainer.neuron_report()
    assert report.masks[0].per_expert == trainer.neuron_mask.per_expert_counts()
    assert "layer_1_expert_3_neurons" in "".join(report.scalars())
    assert "Neurons per routed expert" in report.to_markdown()
    trainer.save_model()
    assert NeuronMask.load(args.output_dir) == trainer.neuron_mask


def test_saved_expert_deltas_load_and_merge_into_a_fresh_model(tmp_path):
    from neft_trl import load_neuron_delta, merge_neuron_delta
    from neft_trl.plots import plot_mask

    model = make_moe("qwen2_moe")
    neuron_map = build_neuron_map(model)
    mask = random_mask(neuron_map, model)
    training = DeltaTraining(model, neuron_map, mask)
    train(model, training)
    trained = logits(model)
    training.save(str(tmp_path))
    loaded = load_neuron_delta(make_moe("qwen2_moe"), tmp_path)  # a fresh model: views installed on load
    torch.testing.assert_close(logits(loaded), trained, rtol=0, atol=1e-6)
    merged = merge_neuron_delta(make_moe("qwen2_moe"), tmp_path)
    torch.testing.assert_close(logits(merged), trained, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="neft_experts"):
        load_neuron_delta(make_moe("qwen2_moe", experts=2), tmp_path)  # experts 2, 3 are absent there
    png = plot_mask(mask, tmp_path / "mask.png")
    assert png.stat().st_size > 1000
