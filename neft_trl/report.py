"""Numbers about a neuron selection: where the neurons sit, what they cost, how selections overlap.

The paper's analysis (Table 6) compares the neurons chosen by different runs; users need the same view
to trust a selection and to reuse one across tasks. ``neuron_report`` computes everything once as plain
data (dataclasses -> ``to_dict()`` for JSON), so the CLI, the trainer, the loggers and the plots all
show the same numbers. Every count comes from ``NeuronMask``; nothing here re-derives a selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .mask import NeuronMask

#: Display order of projection roles; a role outside this list (a custom layout) is shown after them.
ROLE_ORDER = ("up", "gate", "down", "q", "k", "v", "qkv", "o")


@dataclass
class MaskSummary:
    """One mask's counts.

    ``per_layer[layer][role]`` is the number of selected neuron vectors of that role in that layer and
    ``candidates[layer][role]`` the number it could have chosen from. Layers are ints; ``to_dict`` keeps them.
    ``per_expert[layer][expert]``: selected neuron vectors per routed expert (empty for a dense model).
    """

    name: str
    selector: str
    budget: str
    num_selected: int
    num_total: int
    trainable_parameters: int
    total_parameters: int | None
    roles: list[str]
    per_layer: dict[int, dict[str, int]]
    candidates: dict[int, dict[str, int]]
    per_expert: dict[int, dict[int, int]] = field(default_factory=dict)

    @property
    def selected_share(self) -> float:
        return self.num_selected / max(self.num_total, 1)

    @property
    def parameter_share(self) -> float | None:
        """Trainable parameters as a share of the whole model (the paper's x%), when the model size is known."""
        return self.trainable_parameters / self.total_parameters if self.total_parameters else None

    def layer_totals(self) -> dict[int, int]:
        return {layer: sum(roles.values()) for layer, roles in self.per_layer.items()}


@dataclass
class NeuronReport:
    """Summaries of one or more masks, plus pairwise overlap matrices when there are several.

    ``overlap[i][j]`` is the share of mask ``i``'s neurons that mask ``j`` selects too (the paper's Table 6,
    asymmetric when the masks differ in size); ``jaccard[i][j]`` is |A & B| / |A | B| (symmetric).
    """

    masks: list[MaskSummary]
    overlap: list[list[float]]
    jaccard: list[list[float]]

    def to_dict(self) -> dict:
        """Plain JSON-ready data (layer keys become strings only when JSON-encoded)."""
        out = asdict(self)
        for summary, data in zip(self.masks, out["masks"], strict=True):
            data["selected_share"] = summary.selected_share
            data["parameter_share"] = summary.parameter_share
        return out

    def scalars(self, prefix: str = "neft/") -> dict[str, float]:
        """The first mask's numbers as flat scalars, for the Trainer's loggers (TensorBoard, W&B, console)."""
        s = self.masks[0]
        stats: dict[str, float] = {
            f"{prefix}selected_neurons": s.num_selected,
            f"{prefix}candidate_neurons": s.num_total,
            f"{prefix}selected_share": s.selected_share,
            f"{prefix}trainable_parameters": s.trainable_parameters,
        }
        if s.parameter_share is not None:
            stats[f"{prefix}trainable_parameter_share"] = s.parameter_share
        for layer, total in s.layer_totals().items():
            stats[f"{prefix}layer_{layer}_neurons"] = total
            for role, count in s.per_layer[layer].items():
                stats[f"{prefix}layer_{layer}_{role}_neurons"] = count
        for layer, experts in s.per_expert.items():
            for expert, count in experts.items():
                stats[f"{prefix}layer_{layer}_expert_{expert}_neurons"] = count
        return stats

    def to_markdown(self) -> str:
        return render_markdown(self)


def summarize(mask: NeuronMask, name: str = "mask", total_parameters: int | None = None) -> MaskSummary:
    """Count one mask per layer and role. ``total_parameters`` defaults to the count the mask was saved with."""
    if total_parameters is None and mask.metadata.get("model_parameters", "").isdigit():
        total_parameters = int(mask.metadata["model_parameters"])
    per_layer = mask.per_layer_role_counts()
    candidates = mask.per_layer_role_counts(candidates=True)
    roles = sorted({r for counts in per_layer.values() for r in counts}, key=_role_rank)
    return MaskSummary(
        name=name,
        selector=mask.metadata.get("selector", "?"),
        budget=mask.metadata.get("budget", "?"),
        num_selected=mask.num_selected,
        num_total=mask.num_total,
        trainable_parameters=mask.trainable_parameters,
        total_parameters=total_parameters,
        roles=roles,
        per_layer={k: _ordered(v) for k, v in per_layer.items()},
        candidates={k: _ordered(v) for k, v in candidates.items()},
        per_expert=mask.per_expert_counts(),
    )


def neuron_report(
    mask: NeuronMask,
    other_masks: Sequence[NeuronMask] = (),
    names: Sequence[str] | None = None,
    total_parameters: int | None = None,
) -> NeuronReport:
    """Counts for ``mask`` (and ``other_masks``) and, with several masks, their overlap and Jaccard matrices.

    Args:
        mask: the mask to describe.
        other_masks: masks to compare with it; they must have the same layout (a ValueError names the
            differing projections otherwise).
        names: one label per mask (default ``mask``, ``mask_1``, ...).
        total_parameters: the model's parameter count, to report the trainable share as the paper does.
    """
    masks = [mask, *other_masks]
    if names is None:
        names = ["mask"] + [f"mask_{i}" for i in range(1, len(masks))]
    if len(names) != len(masks):
        raise ValueError(f"neuron_report got {len(names)} names for {len(masks)} masks: give one name per mask.")
    summaries = [summarize(m, n, total_parameters) for m, n in zip(masks, names, strict=True)]
    overlap = [[a.overlap(b) for b in masks] for a in masks]  # NeuronMask raises on a layout mismatch
    jaccard = [[a.jaccard(b) for b in masks] for a in masks]
    return NeuronReport(summaries, overlap, jaccard)


def render_markdown(report: NeuronReport) -> str:
    """Markdown tables (readable as plain text): totals, per-layer counts per mask, then overlap matrices."""
    lines = ["| mask | selector | budget | neurons | of candidates | trainable params | of model |",
             "|---|---|---|---:|---:|---:|---:|"]
    for s in report.masks:
        share = f"{s.parameter_share:.2%}" if s.parameter_share is not None else "-"
        lines.append(f"| {s.name} | {s.selector} | {s.budget} | {s.num_selected:,} | {s.selected_share:.2%} | "
                     f"{s.trainable_parameters:,} | {share} |")
    for s in report.masks:
        lines += ["", f"Neurons per layer: {s.name}", "",
                  "| layer | " + " | ".join(s.roles) + " | total | of candidates |",
                  "|---:|" + "---:|" * (len(s.roles) + 2)]
        for layer, counts in s.per_layer.items():
            cells = [f"{counts.get(role, 0):,}" for role in s.roles]
            total, possible = sum(counts.values()), sum(s.candidates[layer].values())
            lines.append(f"| {layer} | " + " | ".join(cells) + f" | {total:,} | {total / max(possible, 1):.2%} |")
        if s.per_expert:
            experts = max(max(c) for c in s.per_expert.values()) + 1
            lines += ["", f"Neurons per routed expert: {s.name}", "",
                      "| layer | " + " | ".join(f"e{e}" for e in range(experts)) + " |", "|---:|" + "---:|" * experts]
            for layer, counts in s.per_expert.items():
                lines.append(f"| {layer} | " + " | ".join(f"{counts.get(e, 0):,}" for e in range(experts)) + " |")
    if len(report.masks) > 1:
        for title, matrix in (("Overlap (share of the row mask's neurons also in the column mask)", report.overlap),
                              ("Jaccard |A & B| / |A | B|", report.jaccard)):
            lines += ["", title, "", "| | " + " | ".join(s.name for s in report.masks) + " |",
                      "|---|" + "---:|" * len(report.masks)]
            for s, row in zip(report.masks, matrix, strict=True):
                lines.append(f"| {s.name} | " + " | ".join(f"{v:.2%}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def _role_rank(role: str) -> tuple[int, str]:
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), role)


def _ordered(counts: dict[str, int]) -> dict[str, int]:
    return {role: counts[role] for role in sorted(counts, key=_role_rank)}
