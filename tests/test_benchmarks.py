"""The benchmark scripts: method names, the equal-parameter LoRA rank, and a --quick end-to-end run of the driver
on the tiny Llama (each method in its own process, table + plot written). The real-model quick run is slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of scripts beside the package, not installed

from benchmarks.methods import (  # noqa: E402
    lora_parameters_per_rank,
    lora_rank_for,
    neft_trainable_parameters,
    parse_method,
)
from neft_trl.budget import Budget  # noqa: E402


def test_parse_method_names_and_errors():
    m = parse_method("neft-hooks-cosine")
    assert (m.family, m.mode, m.selector, m.quantized) == ("neft", "hooks", "cosine", False)
    assert m.sweep_key == "neft-delta-cosine" and m.reference == "lora"
    q = parse_method("qneft-delta-random")
    assert q.quantized and q.reference == "qlora" and q.sweep_key == "qneft-delta-random"
    with pytest.raises(ValueError, match="4-bit model trains through deltas only"):
        parse_method("qneft-hooks-cosine")
    with pytest.raises(ValueError, match="Unknown benchmark method 'lora2'.*neft-delta-<selector>"):
        parse_method("lora2")


def test_lora_rank_matches_the_neft_budget():
    model = make_model("llama")  # hidden 32, intermediate 48, 2 layers, 4 heads / 2 kv heads of 8
    # per layer: q 32+32, k 32+16, v 32+16, o 32+32, gate 32+48, up 32+48, down 48+32 = 464; lm_head excluded
    assert lora_parameters_per_rank(model) == 2 * 464
    neft = neft_trainable_parameters(model, Budget.resolve(num_neurons=29))
    assert neft == 29 * 64  # a candidate (an MLP channel: an up row and a down column) holds 2 x hidden = 64
    assert lora_rank_for(model, neft) == 2  # 1856 / 928
    assert lora_rank_for(model, 10) == 1


def _tiny_model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _compare(tmp_path: Path, model: str | None, methods: str, *extra: str) -> tuple[str, dict]:
    out = tmp_path / "bench"
    flags = ["--quick", "--methods", methods, "--output_dir", str(out), "--threads", "1", *extra]
    if model is not None:
        flags += ["--model", model]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compare", *flags], cwd=ROOT, capture_output=True,
                          text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (out / "table.md").read_text(), json.loads((out / "results.json").read_text())


def test_quick_compare_on_the_tiny_model(tmp_path):
    table, results = _compare(tmp_path, str(_tiny_model_dir(tmp_path)),
                              "full,lora,neft-delta-random,neft-hooks-random", "--param_ratio", "0.1")
    assert set(results) == {"base", "full", "lora", "neft-delta-random", "neft-hooks-random"}
    delta, hooks, lora, full = (results[n]["runs"][0] for n in ("neft-delta-random", "neft-hooks-random", "lora",
                                                                 "full"))
    # equal budget: NeFT trains the budget's neurons; LoRA's rank is the one closest to that size
    assert delta["trainable_parameters"] == hooks["trainable_parameters"] == delta["neft_budget_parameters"]
    assert lora["trainable_parameters"] == lora["lora_rank"] * lora_parameters_per_rank(make_model("llama"))
    assert full["trainable_parameters"] == sum(p.numel() for p in make_model("llama").parameters())
    assert hooks["learning_rate"] == delta["learning_rate"]  # hooks reuse the delta sweep
    for run in (delta, hooks, lora, full):
        assert len(run["step_seconds"]) == 4 and run["median_step_seconds"] > 0 and run["peak_rss_mb"] > 0
        assert [s for s, _ in run["eval_curve"]] == [0, 2, 4]
        assert run["eval_loss_after"] < run["eval_loss_before"]  # lr 1e-3..1e-4 on 4 steps still learns
        assert 0 <= run["chrf"] <= 100
    assert delta["selection_seconds"] > 0 and full["selection_seconds"] == 0
    assert "| neft-delta-random |" in table and "× LoRA" in table and "Targets:" in table
    assert (tmp_path / "bench" / "eval_loss.png").stat().st_size > 1000
    chart = table[table.index("```mermaid"):]
    assert 'x-axis "optimizer step" [0, 2, 4]' in chart and chart.count("    line [") == 4  # base has no curve
    full_curve = ", ".join(f"{loss:.3f}" for _, loss in full["eval_curve"])
    assert f"    line [{full_curve}]" in chart and "blue: full (lr " in chart


@pytest.mark.slow
def test_quick_compare_on_smollm2(tmp_path):
    table, results = _compare(tmp_path, None, "lora,neft-delta-cosine,qneft-delta-cosine,qlora")
    assert {"base", "qbase", "lora", "neft-delta-cosine", "qneft-delta-cosine", "qlora"} == set(results)
    assert results["neft-delta-cosine"]["runs"][0]["eval_loss_after"] < results["base"]["runs"][0][
        "eval_loss_before"]
    assert "| qlora (r=" in table


def test_mermaid_chart_draws_seed_means_on_the_shared_steps():
    from benchmarks.plot import mermaid_eval_curves
    from benchmarks.table import MethodRow

    rows = {"base": MethodRow("base", 0.0, [{"eval_curve": []}]),
            "lora": MethodRow("lora", 3e-3, [{"eval_curve": [[0, 4.0], [10, 2.0], [20, 1.5]]},
                                             {"eval_curve": [[0, 4.0], [10, 3.0], [20, 1.7]]}]),
            "neft-delta-cosine": MethodRow("neft-delta-cosine", 1e-2, [{"eval_curve": [[0, 4.0], [20, 1.4]]}])}
    chart = mermaid_eval_curves(rows, "t")
    assert 'x-axis "optimizer step" [0, 20]' in chart  # step 10 is not shared by every method
    assert "    line [4.000, 1.600]" in chart and "    line [4.000, 1.400]" in chart
    assert 'y-axis "eval loss" 1.35 --> 4.05' in chart
    assert chart.endswith("Lines: blue: lora (lr 0.003), orange: neft-delta-cosine (lr 0.01).")
    many = {f"neft-delta-cosine+probe{i}": MethodRow(f"neft-delta-cosine+probe{i}", 1e-3, [{"eval_curve": [[0, 1.0]]}])
            for i in range(1, 12)}
    assert mermaid_eval_curves(many).endswith("Not drawn: neft-delta-cosine+probe11.")  # past the 10 colours


def test_variants_parse_into_settings_and_bad_ones_are_refused():
    from benchmarks.methods import ablation_methods
    from benchmarks.variants import merge_selector_kwargs, overrides

    m = parse_method("neft-hooks-cosine+probe20+attn+perrole")
    assert (m.selector, m.variants, m.sweep_key) == ("cosine", ("probe20", "attn", "perrole"),
                                                     "neft-delta-cosine+probe20+attn+perrole")
    o = overrides(m.variants, max_steps=60)
    assert o.selector_kwargs == {"probe_steps": 12}
    assert o.config == {"neuron_targets": "mlp,attention", "neuron_scope": "per_role"}
    assert overrides(("probe1",), max_steps=60).selector_kwargs == {"probe_steps": 1}  # at least one step
    assert overrides(("norm", "mlpunit"), 60) == type(o)({"neuron_unit": "mlp"}, {"importance": "norm"})
    assert overrides(("mlpunit", "gate"), 60).config == {"neuron_unit": "mlp", "include_gate": True}
    assert overrides(parse_method("neft-delta-random+protect2.5").variants, 60).config == {"protect_ratio": 0.025}
    with pytest.raises(ValueError, match="Variant 'norm' configures the gradient selector, not 'cosine'"):
        parse_method("neft-delta-cosine+norm")
    with pytest.raises(ValueError, match="Unknown method variant 'atn'.*attn"):
        parse_method("neft-delta-random+atn")
    with pytest.raises(ValueError, match="set \\['neuron_scope'\\] twice"):
        overrides(("perrole", "perlayer"), 60)
    with pytest.raises(ValueError, match="--selector_kwargs sets \\['probe_steps'\\]"):
        merge_selector_kwargs({"probe_steps": 3}, {"probe_steps": 12}, "m")
    names = ablation_methods(["cosine", "random"])
    assert "neft-delta-magnitude" not in names and "neft-delta-magnitude" in ablation_methods(["magnitude"])
    assert all(parse_method(n) for n in names)


def test_prose_probe_is_fixed_seeded_prose():
    from benchmarks.forgetting import prose_dataset, prose_paragraphs

    first, again = prose_paragraphs(16), prose_paragraphs(16)
    assert first == again and len(set(first)) == 16
    assert all(200 <= len(p) <= 800 and p[0].isupper() and p.endswith(".") and "::=" not in p for p in first)
    assert prose_paragraphs(16, seed=1) != first
    data, facts = prose_dataset(4)
    assert data["text"] == prose_paragraphs(4)
    assert facts["prose_source"].startswith("pydoc_data.topics") and len(facts["prose_sha256"]) == 16
    with pytest.raises(ValueError, match="--prose_size must be between 1 and"):
        prose_paragraphs(10**6)


def test_pareto_front_and_forgetting_at_matched_test_loss():
    from benchmarks.tradeoff import forgetting_at, pareto_front, sweep_points, tradeoff_markdown

    def rec(method, lr, loss, forget, seed=0):
        return {"method": method, "family": "x", "learning_rate": lr, "eval_loss_after": loss, "forgetting": forget,
                "seed": seed}

    records = [rec("lora", 1e-3, 3.0, 0.30), rec("lora", 3e-3, 2.8, 0.50), rec("neft", 1e-3, 3.2, 0.05),
               rec("neft", 1e-2, 2.9, 0.20), rec("neft", 1e-2, 2.7, 0.10, seed=1), rec("full", 1e-4, 2.6, 0.9)]
    points = sweep_points(records)
    neft_hi = next(p for p in points if p.method == "neft" and p.learning_rate == 1e-2)
    assert (neft_hi.test_loss, neft_hi.forgetting, neft_hi.seeds) == pytest.approx((2.8, 0.15, 2))
    front = pareto_front(points)
    assert [(p.method, p.learning_rate) for p in front] == [("full", 1e-4), ("neft", 1e-2), ("neft", 1e-3)]
    neft = [p for p in points if p.method == "neft"]
    value, how = forgetting_at(neft, 3.0)  # between (2.8, 0.15) and (3.2, 0.05): halfway
    assert value == pytest.approx(0.10) and "interpolated" in how
    assert forgetting_at(neft, 2.5) == (None, "never reaches it (best 2.800)")
    assert forgetting_at(neft, 3.5)[0] == pytest.approx(0.05)  # every point is better: the nearest
    text = tradeoff_markdown(points, 3.0, "LoRA's")
    assert "| neft | 0.01 | 2 | 2.800 | +0.150 | ★ |" in text and "| lora | +0.300 | at its point" in text


def test_best_dev_checkpoint_restores_the_best_evaluation():
    from types import SimpleNamespace

    from benchmarks.checkpoint import BestDevCheckpoint

    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    frozen = model.bias.detach().clone()
    callback = BestDevCheckpoint()
    for step, loss, value in [(2, 1.0, 1.0), (4, 0.5, 2.0), (6, 0.7, 3.0)]:
        with torch.no_grad():
            model.weight.fill_(value)
        callback.on_evaluate(None, SimpleNamespace(global_step=step), None, metrics={"eval_dev_loss": loss},
                             model=model)
    callback.on_evaluate(None, SimpleNamespace(global_step=8), None, metrics={"eval_test_loss": 0.1}, model=model)
    assert (callback.best_step, callback.best_loss) == (4, 0.5)
    callback.restore(model)
    assert torch.equal(model.weight, torch.full((2, 2), 2.0)) and torch.equal(model.bias, frozen)
    with pytest.raises(RuntimeError, match="No dev evaluation"):
        BestDevCheckpoint().restore(model)


def test_quick_long_regime_with_every_new_option_on_the_tiny_model(tmp_path):
    """Long regime, second language, forgetting, and the ablation variants (attention neurons in hooks and delta
    mode, per-role shares, probe share, full probe, gradient norm, mlp unit) through the driver on the tiny Llama."""
    methods = ("lora,neft-delta-cosine+probe20+attn+perrole,neft-hooks-cosine+probe20+attn+perrole,"
               "neft-delta-gradient+norm+vectorunit,neft-delta-cosine+fullprobe")
    table, results = _compare(tmp_path, str(_tiny_model_dir(tmp_path)), methods, "--param_ratio", "0.1",
                              "--regime", "long", "--lang", "fr")
    attn = results["neft-delta-cosine+probe20+attn+perrole"]["runs"][0]
    hooks = results["neft-hooks-cosine+probe20+attn+perrole"]["runs"][0]
    assert attn["regime"] == "long" and attn["settings"]["lang"] == "fr" and attn["train_pairs"] == 32
    assert attn["max_steps"] == 12 and [s for s, _ in attn["eval_curve"]] == [0, 2, 4, 6, 8, 10, 12]
    dev = dict(attn["dev_curve"])
    assert attn["best_step"] in dev and attn["dev_loss_after"] == min(dev.values())
    assert attn["eval_loss_after"] == dict(attn["eval_curve"])[attn["best_step"]]
    assert attn["forgetting"] == pytest.approx(attn["prose_loss_after"] - attn["prose_loss_before"])
    assert attn["eval_loss_after"] == pytest.approx(hooks["eval_loss_after"], abs=1e-4)  # same weights train
    assert attn["trainable_parameters"] == hooks["trainable_parameters"] <= attn["neft_budget_parameters"]
    for name in ("neft-delta-gradient+norm+vectorunit", "neft-delta-cosine+fullprobe"):
        run = results[name]["runs"][0]
        assert run["eval_loss_after"] < run["eval_loss_before"] and run["variants"] == name.split("+")[1:]
    assert "| forgetting |" in table and "Pareto front" in table and "Forgetting at matched test loss" in table
    # the folder remembers its settings: another regime there is refused, not mixed in
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--quick", "--methods", "lora", "--output_dir",
                           str(tmp_path / "bench"), "--report_only"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "holds runs made with other settings" in proc.stderr


def test_warmup_ratio_reaches_every_method_alike(tmp_path):
    """``--warmup_ratio`` turns into the same number of warmup steps for LoRA and NeFT (a share of this run's steps)."""
    from benchmarks.run_method import RunArguments, training_config

    args = RunArguments(method="lora", output=str(tmp_path / "r.json"), max_steps=60, warmup_ratio=0.1)
    lora = training_config(args, parse_method("lora"), str(tmp_path))
    neft = training_config(args, parse_method("neft-delta-cosine"), str(tmp_path))
    assert lora.warmup_steps == neft.warmup_steps == 6
    assert training_config(RunArguments(method="lora", output="r.json", max_steps=60), parse_method("lora"),
                           str(tmp_path)).warmup_steps == 0
