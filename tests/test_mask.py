"""NeuronMask: budgets, ranking, counts, algebra, safetensors round trip and mismatch errors."""

import pytest
import torch
from conftest import make_model

from neft_trl import Budget, NeuronMask, build_neuron_map
from neft_trl.budget import select_top, validate_scores
from neft_trl.layers import parameter_count


def _scores(nmap, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {grp.key: torch.rand(grp.size, generator=g) for grp in nmap.groups}


@pytest.fixture
def llama():
    model = make_model("llama")
    return model, build_neuron_map(model)


def test_num_neurons_keeps_exactly_the_lowest(llama):
    model, nmap = llama
    scores = _scores(nmap)
    mask = select_top(nmap, scores, Budget.resolve(num_neurons=10), parameter_count(model), keep="lowest")
    assert mask.num_selected == 10 and mask.num_total == 4 * 48
    flat = torch.cat([scores[g.key] for g in nmap.groups])
    chosen = torch.cat([mask.selected[g.key] for g in nmap.groups])
    assert torch.equal(chosen.nonzero().flatten().sort().values, flat.argsort()[:10].sort().values)
    highest = select_top(nmap, scores, Budget.resolve(num_neurons=10), parameter_count(model), keep="highest")
    assert (highest & mask).num_selected == 0


def test_param_ratio_is_a_share_of_all_parameters(llama):
    model, nmap = llama
    total = parameter_count(model)
    mask = select_top(nmap, _scores(nmap), Budget.resolve(param_ratio=0.05), total)
    assert mask.trainable_parameters <= 0.05 * total < mask.trainable_parameters + 32
    assert mask.metadata["budget"] == "param_ratio=0.05"


def test_neuron_ratio_and_per_layer_scope(llama):
    model, nmap = llama
    mask = select_top(nmap, _scores(nmap), Budget.resolve(neuron_ratio=0.25), parameter_count(model),
                      scope="per_layer")
    assert mask.num_selected == 48
    assert mask.per_layer_counts() == {0: 24, 1: 24}
    by_role = mask.per_layer_role_counts()
    assert {layer: sum(roles.values()) for layer, roles in by_role.items()} == mask.per_layer_counts()
    assert mask.per_layer_role_counts(candidates=True) == {layer: {"up": 48, "down": 48} for layer in (0, 1)}


@pytest.mark.parametrize("scope", ["per_layer", "per_role"])
def test_shared_budgets_add_up_to_the_budget(llama, scope):
    """Per-pool shares are apportioned by largest remainder: 7 neurons over 2 pools are 4 + 3, not 4 + 4, and the
    odd one goes to the pool whose next candidate scores best."""
    model, nmap = llama
    total = parameter_count(model)
    scores = _scores(nmap)
    mask = select_top(nmap, scores, Budget.resolve(num_neurons=7), total, scope=scope)
    assert mask.num_selected == 7
    counts = mask.per_layer_counts() if scope == "per_layer" else {
        role: sum(r[role] for r in mask.per_layer_role_counts().values()) for role in ("up", "down")}
    assert sorted(counts.values()) == [3, 4]
    pools = mask.per_layer_counts().keys() if scope == "per_layer" else ("up", "down")
    fourth_best = {pool: sorted(float(v) for g in nmap.groups for v in scores[g.key]
                                if (g.layer if scope == "per_layer" else g.projections[0].role) == pool)[3]
                   for pool in pools}
    assert counts[min(fourth_best, key=fourth_best.get)] == 4
    ratio = select_top(nmap, scores, Budget.resolve(neuron_ratio=0.05), total, scope=scope)  # 9.6 of 192: 10
    assert ratio.num_selected == select_top(nmap, scores, Budget.resolve(neuron_ratio=0.05), total).num_selected == 10
    by_params = select_top(nmap, scores, Budget.resolve(param_ratio=0.05), total, scope=scope)
    per_neuron = nmap.groups[0].params_per_neuron
    assert 0.05 * total - per_neuron < by_params.trainable_parameters <= 0.05 * total


def test_default_budget_is_the_papers_six_percent():
    assert Budget.resolve() == Budget(param_ratio=0.06)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"param_ratio": 0.0}, r"param_ratio must be in \(0, 1\]"),
        ({"neuron_ratio": 1.5}, r"neuron_ratio must be in \(0, 1\]"),
        ({"num_neurons": 0}, "positive integer"),
        ({"param_ratio": 0.1, "num_neurons": 3}, "exactly one"),
    ],
)
def test_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget.resolve(**kwargs)


def test_budget_larger_than_candidates(llama):
    model, nmap = llama
    with pytest.raises(ValueError, match="exceeds the 192 candidate"):
        select_top(nmap, _scores(nmap), Budget.resolve(num_neurons=193), parameter_count(model))
    with pytest.raises(ValueError, match="param_ratio <="):
        select_top(nmap, _scores(nmap), Budget.resolve(param_ratio=0.9), parameter_count(model))


def test_score_validation_names_the_selector(llama):
    _, nmap = llama
    scores = _scores(nmap)
    bad = dict(scores, **{nmap.groups[0].key: torch.full((48,), float("nan"))})
    with pytest.raises(ValueError, match="'mine' returned NaN"):
        validate_scores(nmap, bad, "mine")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        validate_scores(nmap, dict(scores, **{nmap.groups[0].key: torch.zeros(3)}), "mine")
    with pytest.raises(ValueError, match="expected 4"):
        validate_scores(nmap, {nmap.groups[0].key: scores[nmap.groups[0].key]}, "mine")


def test_mlp_unit_ties_rows_and_columns(tmp_path):
    model = make_model("llama")
    nmap = build_neuron_map(model, unit="mlp")
    mask = select_top(nmap, _scores(nmap), Budget.resolve(num_neurons=5), parameter_count(model))
    up, down = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"
    assert torch.equal(mask.selected[up], mask.selected[down])
    assert mask.num_selected == 10  # 5 units x 2 projections
    assert NeuronMask.load(mask.save(tmp_path / "m.safetensors")) == mask  # tied choices still save one by one


def test_algebra_and_overlap(llama):
    model, nmap = llama
    total = parameter_count(model)
    a = select_top(nmap, _scores(nmap, 1), Budget.resolve(num_neurons=40), total)
    b = select_top(nmap, _scores(nmap, 2), Budget.resolve(num_neurons=40), total)
    both, either = a & b, a | b
    assert both.num_selected + either.num_selected == a.num_selected + b.num_selected
    assert a.overlap(b) == pytest.approx(both.num_selected / 40)
    assert a.jaccard(b) == pytest.approx(both.num_selected / either.num_selected)
    assert a.overlap(a) == 1.0
    assert sum(a.per_layer_counts().values()) == 40


def test_save_load_round_trip(tmp_path, llama):
    model, nmap = llama
    mask = select_top(nmap, _scores(nmap), Budget.resolve(num_neurons=7), parameter_count(model),
                      metadata={"selector": "test"})
    path = mask.save(tmp_path / "m.safetensors")
    loaded = NeuronMask.load(path)
    assert loaded == mask
    assert loaded.metadata["selector"] == "test" and loaded.metadata["model_type"] == "llama"
    assert loaded.trainable_parameters == mask.trainable_parameters
    assert NeuronMask.load(tmp_path / "m.safetensors").per_layer_counts() == mask.per_layer_counts()
    assert mask.save(tmp_path).name == "neuron_mask.safetensors"  # a folder gets the standard file name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "neuron_mask.safetensors"]  # no temp file


def test_mask_from_another_model_names_both_shapes(llama):
    model, nmap = llama
    mask = select_top(nmap, _scores(nmap), Budget.resolve(num_neurons=7), parameter_count(model))
    qwen_map = build_neuron_map(make_model("qwen2"))
    with pytest.raises(ValueError, match=r"48 in the mask vs 40") as err:
        mask.check_fits(qwen_map)
    assert "intermediate size 48" in str(err.value) and "intermediate size 40" in str(err.value)
    with pytest.raises(ValueError, match="absent"):
        mask.check_fits(build_neuron_map(make_model("gpt2")))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No neuron mask"):
        NeuronMask.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a neft_trl neuron mask"):
        NeuronMask.load(tmp_path / "other.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)  # a corrupt header: safetensors' own error type
    with pytest.raises(ValueError, match="is not a neft_trl neuron mask"):
        NeuronMask.load(tmp_path / "garbage.safetensors")
