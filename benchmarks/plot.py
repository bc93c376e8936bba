"""The eval-loss-vs-steps PNG: one line per method at its best learning rate, the mean over seeds, with the
seeds' min-max as a band. 4-bit methods are dashed. Uses matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import os
from collections import defaultdict

from .methods import parse_method
from .table import MethodRow


def plot_eval_curves(rows: dict[str, MethodRow], path: str | os.PathLike, title: str = "") -> str:
    """Write the plot to ``path`` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, row in rows.items():
        method = parse_method(name)
        if method.family == "base":
            continue
        points: dict[int, list[float]] = defaultdict(list)
        for run in row.runs:
            for step, loss in run["eval_curve"]:
                points[int(step)].append(float(loss))
        steps = sorted(points)
        means = [sum(points[s]) / len(points[s]) for s in steps]
        line, = ax.plot(steps, means, marker=".", linestyle="--" if method.quantized else "-",
                        label=f"{name} (lr {row.learning_rate:g})")
        if len(row.runs) > 1:
            ax.fill_between(steps, [min(points[s]) for s in steps], [max(points[s]) for s in steps],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out eval loss")
    ax.set_title(title or "Eval loss vs steps (mean over seeds, band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
