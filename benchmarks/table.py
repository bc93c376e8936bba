"""Turn run records (``run_method`` JSON) into per-method rows, the markdown table and the target checks.

Each method is reported at its best learning rate (lowest mean dev loss, never the test loss), as the mean
over seeds with the spread (sample std, or 0 for one seed) beside it. Step time and memory are divided by
LoRA's at the same precision (QLoRA for 4-bit rows). Forgetting is the rise of the loss on general English
prose (``forgetting.py``) from before to after training. Where the driver ran separate cost runs (alone on the
machine, see ``compare.py``), step time and memory come from those; quality always comes from the
quality runs.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .methods import parse_method

#: The NeFT configuration NeFTConfig's defaults give (selector cosine; auto mode is delta), checked against the goal.
DEFAULT_NEFT = "neft-delta-cosine"


@dataclass
class Stat:
    """Mean and spread of one number over seeds."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def fmt(self, digits: int = 3) -> str:
        if not self.values:
            return "–"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" if len(self.values) > 1 else f"{self.mean:.{digits}f}"


@dataclass
class MethodRow:
    """One method at its best learning rate."""

    method: str
    learning_rate: float
    runs: list[dict[str, Any]]
    cost_runs: list[dict[str, Any]] = field(default_factory=list)

    def stat(self, key: str, cost: bool = False) -> Stat:
        source = (self.cost_runs or self.runs) if cost else self.runs
        return Stat([float(r[key]) for r in source if r.get(key) is not None])

    @property
    def memory_key(self) -> str:
        """GPU runs compare allocated CUDA memory (what limits them); CPU runs compare peak RSS."""
        return "peak_cuda_mb" if any(r.get("peak_cuda_mb") for r in self.runs) else "peak_rss_mb"

    @property
    def trainable(self) -> int:
        return int(self.runs[0]["trainable_parameters"])

    @property
    def selection_share(self) -> Stat:
        """Selection time over selection + training steps (evaluation excluded), per run."""
        return Stat([r["selection_seconds"] / (r["selection_seconds"] + sum(r["step_seconds"])) for r in self.runs])


def best_rows(records: Iterable[dict[str, Any]], cost_records: Iterable[dict[str, Any]] = ()) -> dict[str, MethodRow]:
    """``{method: MethodRow}`` at each method's best learning rate (lowest mean dev loss)."""
    by_method: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_method[r["method"]][r["learning_rate"]].append(r)
    costs: dict[str, list[dict]] = defaultdict(list)
    for r in cost_records:
        costs[r["method"]].append(r)
    rows = {}
    for method, by_lr in by_method.items():
        if parse_method(method).family == "base":
            lr, runs = next(iter(by_lr.items()))
        else:
            lr, runs = min(by_lr.items(), key=lambda item: statistics.fmean(r["dev_loss_after"] for r in item[1]))
        rows[method] = MethodRow(method, lr, runs, [c for c in costs[method] if c["learning_rate"] == lr])
    return rows


def _ratio(row: MethodRow, reference: MethodRow | None, key: str) -> str:
    if reference is None:
        return "–"
    mine, theirs = row.stat(key, cost=True).mean, reference.stat(key, cost=True).mean
    return f"{mine / theirs:.2f}×" if theirs else "–"


def markdown_table(rows: dict[str, MethodRow]) -> str:
    """The results table, one line per method, in the order the rows were given."""
    header = ("| method | trainable params | lr | eval loss before → after | chrF | forgetting | median step (s) "
              "| step × LoRA | peak mem (MiB) | mem × LoRA | selection (s) | selection share |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    any_cost = any(row.cost_runs for row in rows.values())
    for name, row in rows.items():
        method = parse_method(name)
        if method.family == "base":
            lines.append(f"| {name} (untrained) | 0 | – | {row.stat('eval_loss_before').fmt()} | "
                         f"{row.stat('chrf').fmt(1)} | – | – | – | – | – | – | – |")
            continue
        reference = rows.get(method.reference)
        mem = row.memory_key
        extra = f" (r={row.runs[0]['lora_rank']})" if "lora_rank" in row.runs[0] else ""
        if any_cost and not row.cost_runs:
            extra += " †"  # its step time and memory come from the quality runs (see the note under the table)
        lines.append(
            f"| {name}{extra} | {row.trainable:,} | {row.learning_rate:g} | {row.stat('eval_loss_before').mean:.3f} → "
            f"{row.stat('eval_loss_after').fmt()} | {row.stat('chrf').fmt(1)} | {row.stat('forgetting').fmt()} | "
            f"{row.stat('median_step_seconds', cost=True).fmt(3)} | {_ratio(row, reference, 'median_step_seconds')} | "
            f"{row.stat(mem, cost=True).fmt(0)} | {_ratio(row, reference, mem)} | "
            f"{row.stat('selection_seconds').fmt(1) if method.family == 'neft' else '–'} | "
            f"{row.selection_share.fmt(3) if method.family == 'neft' else '–'} |"
        )
    return "\n".join(lines)


def target_checks(rows: dict[str, MethodRow], long_regime: bool = False) -> list[str]:
    """The project's targets, each as "PASS"/"MISS" with the numbers behind it (skipped where a row is missing).

    The quality goal is checked for ``DEFAULT_NEFT`` (NeFT as ``NeFTConfig()`` configures it): test loss and
    forgetting at or below LoRA's and, in the long regime, test loss at or below full fine-tuning's; a miss
    gives the gap.
    """
    checks: list[str] = []

    def check(label: str, ok: bool, detail: str) -> None:
        checks.append(f"- {'PASS' if ok else 'MISS'}: {label} ({detail})")

    def cost(name: str, key: str) -> float:
        return rows[name].stat(key, cost=True).mean

    for name, row in rows.items():
        method = parse_method(name)
        ref = method.reference
        if method.family == "neft" and method.mode == "delta" and ref in rows:
            mem = row.memory_key
            s, r = cost(name, "median_step_seconds"), cost(ref, "median_step_seconds")
            check(f"{name} step time <= {ref}", s <= r, f"{s:.3f}s vs {r:.3f}s")
            m, rm = cost(name, mem), cost(ref, mem)
            check(f"{name} peak memory <= {ref}", m <= rm, f"{m:.0f} vs {rm:.0f} MiB {mem}")
        if method.family == "neft" and method.mode == "hooks" and "full" in rows:
            s, f = cost(name, "median_step_seconds"), cost("full", "median_step_seconds")
            check(f"{name} step time <= 1.05x full", s <= 1.05 * f, f"{s / f:.2f}x")
        if method.family == "neft":
            share = row.selection_share.mean
            check(f"{name} selection <= 10% of the run", share <= 0.10, f"{share:.1%}")
    for prefix in ("neft-delta", "neft-hooks", "qneft-delta"):
        cosine, random = rows.get(f"{prefix}-cosine"), rows.get(f"{prefix}-random")
        if cosine and random:
            c, r = cosine.stat("eval_loss_after").mean, random.stat("eval_loss_after").mean
            check(f"{prefix}-cosine eval loss < {prefix}-random", c < r, f"{c:.3f} vs {r:.3f}")
        ref = "qlora" if prefix.startswith("q") else "lora"
        if cosine and ref in rows:
            c, r = cosine.stat("eval_loss_after").mean, rows[ref].stat("eval_loss_after").mean
            check(f"{prefix}-cosine eval loss <= {ref}", c <= r, f"{c:.3f} vs {r:.3f}")
    default = rows.get(DEFAULT_NEFT)
    refs = [("lora", "eval_loss_after"), ("lora", "forgetting")]
    refs += [("full", "eval_loss_after")] if long_regime else []
    for ref, key in refs:
        mine, theirs = (default.stat(key).mean, rows[ref].stat(key).mean) if default and ref in rows else (None, None)
        if mine is None or theirs is None or theirs != theirs or mine != mine:  # a row or its numbers missing (NaN)
            continue
        check(f"{DEFAULT_NEFT} (the default) {key.removesuffix('_after')} <= {ref}", mine <= theirs,
              f"{mine:.3f} vs {theirs:.3f}, gap {mine - theirs:+.3f}")
    return checks
