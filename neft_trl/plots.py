"""Pictures of a neuron selection: a heatmap of which neurons were picked in each layer, and counts per layer.

The paper's insight is *where* task-relevant neurons sit; a heatmap (layers x neuron index, one panel per
projection role) shows at a glance whether a selection is concentrated in a few layers or spread out, and
a bar chart gives the per-layer counts. Plots are drawn on plain ``matplotlib.figure.Figure`` objects, never
through ``pyplot``: they work on headless servers, and importing this module leaves the caller's backend (a
notebook's inline figures, an interactive window) untouched.
Figure sizes are fixed (constrained layout, no tight bounding box) so a PNG's pixel size is
``size * dpi``, predictable for reports and tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .mask import NeuronMask
from .report import summarize

#: Wider intermediate sizes are averaged into this many columns, so every selected neuron stays visible
#: as a share of its bin instead of vanishing when 11008 neurons meet ~1000 pixels.
MAX_COLUMNS = 512
DEFAULT_SIZE = (10.0, 6.0)
DEFAULT_DPI = 100


def selection_matrix(mask: NeuronMask, role: str, max_columns: int = MAX_COLUMNS) -> np.ndarray:
    """``[layers, columns]`` float array: 1/0 per neuron, or the selected share of each bin of neurons.

    Layers whose projection of this role is narrower than the widest one are padded with NaN (drawn blank).
    In a mixture-of-experts mask a row is one MLP of a layer: its shared or dense MLP first, then each expert.
    """
    rows: dict[tuple[int, int], np.ndarray] = {}
    for module, selected in mask.selected.items():
        if mask.info[module]["role"] == role:
            rows[_row_key(mask.info[module])] = selected.numpy().astype(np.float64)
    if not rows:
        raise ValueError(f"The mask has no {role!r} projections (roles: {sorted(_roles(mask))}).")
    width = max(r.size for r in rows.values())
    bins = min(width, max_columns)
    edges = np.linspace(0, width, bins + 1).round().astype(int)  # strictly increasing because bins <= width
    out = np.empty((len(rows), bins))
    for i, layer in enumerate(sorted(rows)):
        padded = np.full(width, np.nan)
        padded[: rows[layer].size] = rows[layer]
        valid = ~np.isnan(padded)
        sums = np.add.reduceat(np.where(valid, padded, 0.0), edges[:-1])
        counts = np.add.reduceat(valid.astype(np.float64), edges[:-1])
        out[i] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return out


def draw_heatmap(ax: Axes, mask: NeuronMask, role: str, max_columns: int = MAX_COLUMNS) -> None:
    """One role's selection on ``ax`` with its own colour bar: rows are layers (or layer/expert), columns neurons."""
    matrix = selection_matrix(mask, role, max_columns)
    of_role = {m: t for m, t in mask.selected.items() if mask.info[m]["role"] == role}
    keys = sorted({_row_key(mask.info[m]) for m in of_role})
    layers = [str(layer) if expert < 0 else f"{layer}/e{expert}" for layer, expert in keys]
    width = max(t.numel() for t in of_role.values())
    # Binned shares of a small budget sit near 0: scale the colours to the densest bin so patterns show.
    vmax = 1.0 if width <= max_columns else max(float(np.nanmax(matrix)), 1e-9)
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", cmap="viridis",
                      vmin=0.0, vmax=vmax, extent=(0, width, len(layers) - 0.5, -0.5))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))  # readable with 80 layers too
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: str(layers[int(y)]) if 0 <= y < len(layers) else ""))
    ax.set_ylabel("layer" if all(expert < 0 for _, expert in keys) else "layer / expert")
    ax.set_xlabel("neuron index")
    chosen, total = sum(int(t.sum()) for t in of_role.values()), sum(t.numel() for t in of_role.values())
    ax.set_title(f"{role}: {chosen:,} of {total:,} neurons selected")
    ax.figure.colorbar(image, ax=ax, label="selected" if width <= max_columns else "share selected per bin")


def draw_layer_counts(ax: Axes, mask: NeuronMask) -> None:
    """Stacked bars of selected neurons per layer, one colour per role."""
    summary = summarize(mask)
    layers = list(summary.per_layer)
    bottom = np.zeros(len(layers))
    for role in summary.roles:
        counts = np.array([summary.per_layer[layer].get(role, 0) for layer in layers], dtype=float)
        ax.bar(layers, counts, bottom=bottom, label=role)
        bottom += counts
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("selected neurons")
    ax.set_title(f"{summary.num_selected:,} of {summary.num_total:,} neurons ({summary.selected_share:.2%})")
    ax.legend()


def draw_expert_counts(ax: Axes, mask: NeuronMask) -> None:
    """Selected neurons per routed expert (rows: layers, columns: experts) of a mixture-of-experts mask."""
    counts = mask.per_expert_counts()
    if not counts:
        raise ValueError("The mask has no routed experts: use draw_layer_counts for a dense model's mask.")
    layers = list(counts)
    experts = max(max(c) for c in counts.values()) + 1
    matrix = np.array([[counts[layer].get(e, 0) for e in range(experts)] for layer in layers], dtype=float)
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"selected neurons per expert ({int(matrix.sum()):,} in routed experts)")
    ax.figure.colorbar(image, ax=ax, label="selected neurons")


def plot_heatmap(mask: NeuronMask, path: str | os.PathLike, size: tuple[float, float] = DEFAULT_SIZE,
                 dpi: int = DEFAULT_DPI) -> Path:
    """PNG heatmap of the selected neurons per layer, one panel per role. Returns the written path."""
    roles = summarize(mask).roles
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    axes = fig.subplots(len(roles), 1, squeeze=False)
    for ax, role in zip(axes[:, 0], roles, strict=True):
        draw_heatmap(ax, mask, role)
    return _save(fig, path, _title(mask))


def plot_layer_counts(mask: NeuronMask, path: str | os.PathLike, size: tuple[float, float] = DEFAULT_SIZE,
                      dpi: int = DEFAULT_DPI) -> Path:
    """PNG bar chart of selected neurons per layer, stacked by role. Returns the written path."""
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    draw_layer_counts(fig.subplots(), mask)
    return _save(fig, path, _title(mask))


def plot_mask(mask: NeuronMask, path: str | os.PathLike, size: tuple[float, float] = (10.0, 8.0),
              dpi: int = DEFAULT_DPI) -> Path:
    """One PNG with both views: a heatmap panel per role, then the per-layer bar chart (and, for a
    mixture-of-experts mask, the counts per expert). Returns the path."""
    roles = summarize(mask).roles
    extra = 2 if mask.per_expert_counts() else 1
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    axes = fig.subplots(len(roles) + extra, 1, squeeze=False)
    for ax, role in zip(axes[:len(roles), 0], roles, strict=True):
        draw_heatmap(ax, mask, role)
    draw_layer_counts(axes[len(roles), 0], mask)
    if extra == 2:
        draw_expert_counts(axes[-1, 0], mask)
    return _save(fig, path, _title(mask))


def _title(mask: NeuronMask) -> str:
    meta = mask.metadata
    return f"{meta.get('model_type', 'model')}: selector {meta.get('selector', '?')}, {meta.get('budget', '?')}"


def _save(fig: Figure, path: str | os.PathLike, title: str) -> Path:
    """Write ``fig`` as PNG. A pyplot-free ``Figure`` is never registered with pyplot, so nothing to close."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"Plots are written as PNG: give a path ending in .png, got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.suptitle(title)
    fig.savefig(path, format="png")
    return path


def _row_key(info) -> tuple[int, int]:
    """(layer, expert) of a projection; -1 for a dense or shared-expert MLP, so it sorts before the experts."""
    expert = info.get("expert")
    return int(info["layer"]), -1 if expert is None else int(expert)


def _roles(mask: NeuronMask) -> set[str]:
    return {str(info["role"]) for info in mask.info.values()}
