"""The eval-loss-vs-steps plot, one line per method at its best learning rate (the mean over seeds), twice:

* ``plot_eval_curves``: a PNG (matplotlib's Agg backend, no display needed), the seeds' min-max as a band,
  4-bit methods dashed;
* ``mermaid_eval_curves``: the same means as a Mermaid ``xychart-beta`` block, text that a README can hold and
  GitHub draws, so the published plot is source, not a committed image.
"""

from __future__ import annotations

import os
from collections import defaultdict

from .methods import parse_method
from .table import MethodRow

#: Line colours of the Mermaid chart, in method order (matplotlib's tab10), named in the legend line under it.
MERMAID_COLOURS = (("#1f77b4", "blue"), ("#ff7f0e", "orange"), ("#2ca02c", "green"), ("#d62728", "red"),
                   ("#9467bd", "purple"), ("#8c564b", "brown"), ("#e377c2", "pink"), ("#7f7f7f", "grey"),
                   ("#bcbd22", "olive"), ("#17becf", "cyan"))


def seed_curves(rows: dict[str, MethodRow]) -> dict[str, dict[int, list[float]]]:
    """``{method: {step: [eval loss of each seed]}}`` for every trained method (the base row has no curve)."""
    curves = {}
    for name, row in rows.items():
        if parse_method(name).family == "base":
            continue
        points: dict[int, list[float]] = defaultdict(list)
        for run in row.runs:
            for step, loss in run["eval_curve"]:
                points[int(step)].append(float(loss))
        curves[name] = dict(sorted(points.items()))
    return curves


def plot_eval_curves(rows: dict[str, MethodRow], path: str | os.PathLike, title: str = "") -> str:
    """Write the plot to ``path`` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, points in seed_curves(rows).items():
        steps = list(points)
        means = [sum(v) / len(v) for v in points.values()]
        line, = ax.plot(steps, means, marker=".", linestyle="--" if parse_method(name).quantized else "-",
                        label=f"{name} (lr {rows[name].learning_rate:g})")
        if len(rows[name].runs) > 1:
            ax.fill_between(steps, [min(v) for v in points.values()], [max(v) for v in points.values()],
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


def mermaid_eval_curves(rows: dict[str, MethodRow], title: str = "Eval loss vs steps (mean over seeds)") -> str:
    """The mean curves as a fenced Mermaid ``xychart-beta`` block plus a legend line naming each line's colour.

    Mermaid's chart has one shared x axis, so only the steps every method evaluated are drawn; methods past
    the palette's length are left out and the legend says so.
    """
    curves = seed_curves(rows)
    shown = dict(list(curves.items())[:len(MERMAID_COLOURS)])
    if not shown:
        return ""
    steps = sorted(set.intersection(*(set(points) for points in shown.values())))
    means = {name: [sum(points[s]) / len(points[s]) for s in steps] for name, points in shown.items()}
    low = min(min(v) for v in means.values())
    high = max(max(v) for v in means.values())
    palette = ", ".join(code for code, _ in MERMAID_COLOURS[:len(shown)])
    lines = ["```mermaid", '%%{init: {"themeVariables": {"xyChart": {"plotColorPalette": "' + palette + '"}}}}%%',
             "xychart-beta", f'    title "{title}"', f"    x-axis \"optimizer step\" [{', '.join(map(str, steps))}]",
             f'    y-axis "eval loss" {low - 0.05:.2f} --> {high + 0.05:.2f}']
    lines += [f"    line [{', '.join(f'{v:.3f}' for v in values)}]" for values in means.values()]
    legend = ", ".join(f"{colour}: {name} (lr {rows[name].learning_rate:g})"
                       for (_, colour), name in zip(MERMAID_COLOURS[:len(shown)], shown, strict=True))
    left = [name for name in curves if name not in shown]
    return "\n".join([*lines, "```", "", f"Lines: {legend}." + (f" Not drawn: {', '.join(left)}." if left else "")])
