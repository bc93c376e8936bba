"""The quality/forgetting trade-off over each method's learning-rate sweep.

A method can buy a lower test loss with a higher learning rate and more forgetting, so comparing methods each
at its best in-domain learning rate alone would favour whoever forgets most. Every (method, learning rate) of
the sweep is a point (mean test loss over its seeds, mean forgetting); this module reports

* the **Pareto front** over all points: those no other point beats on both axes (lower or equal test loss
  *and* forgetting, one of them strictly lower);
* **forgetting at matched test loss**: each method's forgetting, linearly interpolated along its own sweep
  (points ordered by test loss) at one target test loss, by default LoRA's at its chosen learning rate.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Point:
    """One method at one learning rate: mean test loss and mean forgetting over its seeds."""

    method: str
    learning_rate: float
    test_loss: float
    forgetting: float
    seeds: int

    def dominates(self, other: Point) -> bool:
        return (self.test_loss <= other.test_loss and self.forgetting <= other.forgetting
                and (self.test_loss < other.test_loss or self.forgetting < other.forgetting))


def sweep_points(records: Iterable[dict[str, Any]]) -> list[Point]:
    """A point per trained (method, learning rate); runs without a forgetting probe are left out."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("family") != "base" and r.get("forgetting") is not None:
            groups[(r["method"], r["learning_rate"])].append(r)
    return sorted((Point(m, lr, statistics.fmean(r["eval_loss_after"] for r in runs),
                         statistics.fmean(r["forgetting"] for r in runs), len(runs))
                   for (m, lr), runs in groups.items()), key=lambda p: (p.method, p.learning_rate))


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point dominates, by test loss."""
    return sorted((p for p in points if not any(q.dominates(p) for q in points)), key=lambda p: p.test_loss)


def forgetting_at(points: list[Point], target: float) -> tuple[float | None, str]:
    """``(forgetting, how)`` of one method's sweep at test loss ``target``.

    Interpolated between the two sweep points that bracket ``target``; where every point is better than the
    target the nearest one is given (marked), and where none reaches it, None.
    """
    ordered = sorted(points, key=lambda p: p.test_loss)
    exact = next((p for p in ordered if p.test_loss == target), None)
    if exact is not None:
        return exact.forgetting, f"at its point (lr {exact.learning_rate:g})"
    if not ordered or ordered[0].test_loss > target:
        best = f"{ordered[0].test_loss:.3f}" if ordered else "no runs"
        return None, f"never reaches it (best {best})"
    for low, high in zip(ordered, ordered[1:], strict=False):
        if low.test_loss <= target <= high.test_loss:
            span = high.test_loss - low.test_loss
            t = (target - low.test_loss) / span if span else 0.0
            value = low.forgetting + t * (high.forgetting - low.forgetting)
            return value, f"interpolated, lr {low.learning_rate:g}..{high.learning_rate:g}"
    nearest = ordered[-1]  # every point is below the target: the closest is the worst
    return nearest.forgetting, f"nearest point (lr {nearest.learning_rate:g}, test {nearest.test_loss:.3f})"


def tradeoff_markdown(points: list[Point], target: float | None, target_label: str) -> str:
    """The sweep points (front marked), then forgetting per method at the matched test loss."""
    if not points:
        return "No forgetting numbers (runs without --prose_size): no trade-off."
    front = set(pareto_front(points))
    lines = ["Trade-off over each method's learning-rate sweep (test loss vs forgetting = prose loss rise; "
             "★ = on the Pareto front):", "",
             "| method | lr | seeds | test loss | forgetting | front |", "|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.method} | {p.learning_rate:g} | {p.seeds} | {p.test_loss:.3f} | {p.forgetting:+.3f} | "
                     f"{'★' if p in front else ''} |")
    if target is None:
        return "\n".join(lines)
    lines += ["", f"Forgetting at matched test loss {target:.3f} ({target_label}):", "",
              "| method | forgetting | how |", "|---|---|---|"]
    by_method: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        by_method[p.method].append(p)
    for method, own in by_method.items():
        value, how = forgetting_at(own, target)
        lines.append(f"| {method} | {'–' if value is None else f'{value:+.3f}'} | {how} |")
    return "\n".join(lines)
