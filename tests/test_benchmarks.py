"""The benchmark scripts: method names, the equal-parameter LoRA rank, and a --quick end-to-end run of the driver
on the tiny Llama (each method in its own process, table + plot written). The real-model quick run is slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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
    neft = neft_trainable_parameters(model, Budget.resolve(num_neurons=58))
    assert neft == 58 * 32  # every candidate vector of this model holds hidden_size = 32 parameters
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


@pytest.mark.slow
def test_quick_compare_on_smollm2(tmp_path):
    table, results = _compare(tmp_path, None, "lora,neft-delta-cosine,qneft-delta-cosine,qlora")
    assert {"base", "qbase", "lora", "neft-delta-cosine", "qneft-delta-cosine", "qlora"} == set(results)
    assert results["neft-delta-cosine"]["runs"][0]["eval_loss_after"] < results["base"]["runs"][0][
        "eval_loss_before"]
    assert "| qlora (r=" in table
