"""The neuron budget and the ranking that turns a selector's scores into a ``NeuronMask``.

The paper's budget is a share of *all* model parameters (NeFT 6% on Llama-2-7B = 100k neurons), so
``param_ratio`` is the default; ``neuron_ratio`` (share of candidate neurons) and ``num_neurons`` (a count)
are the alternatives. Exactly one applies. Ranking pools all layers (``scope="global"``, the paper, and
``select_top``'s plain one-pool ranking), keeps the same share in every layer (``scope="per_layer"``, the default
of the trainer and ``select_neurons``), in every projection role over all layers (``scope="per_role"``: up rows
and down columns, or q/k/v/o, each get the same share instead of competing for one pool), or in every routed
expert of a mixture-of-experts model (``scope="per_expert"``: each (layer, expert) is a pool, and a layer's
dense or shared-expert MLP is one too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import UsageError
from .mask import NeuronMask
from .neurons import NeuronGroup, NeuronMap

DEFAULT_PARAM_RATIO = 0.06
SCOPES = ("global", "per_layer", "per_role", "per_expert")
#: The default of ``NeFTConfig.neuron_scope`` and ``select_neurons``. The paper pools all layers; on the
#: benchmark the cosine ranking then piles the budget into a few middle layers, and the same share in every
#: layer reached a lower test loss at the same forgetting (README "Results").
DEFAULT_NEURON_SCOPE = "per_layer"


@dataclass(frozen=True)
class Budget:
    """How many neurons to keep. Build with ``Budget.resolve`` so that exactly one field is set."""

    param_ratio: float | None = None
    neuron_ratio: float | None = None
    num_neurons: int | None = None

    @classmethod
    def resolve(
        cls, param_ratio: float | None = None, neuron_ratio: float | None = None, num_neurons: int | None = None
    ) -> Budget:
        given = {k: v for k, v in [("param_ratio", param_ratio), ("neuron_ratio", neuron_ratio),
                                   ("num_neurons", num_neurons)] if v is not None}
        if len(given) > 1:
            raise UsageError(f"Set exactly one neuron budget, got {given}: unset all but one of them.")
        if not given:
            return cls(param_ratio=DEFAULT_PARAM_RATIO)
        (name, value), = given.items()
        if name == "num_neurons":
            if int(value) != value or value < 1:
                raise UsageError(f"num_neurons must be a positive integer, got {value!r}.")
        elif not 0 < value <= 1:
            raise UsageError(f"{name} must be in (0, 1] (a share, e.g. 0.06 for 6%), got {value!r}.")
        return cls(**given)

    def __str__(self) -> str:
        name, value = next((k, v) for k, v in vars(self).items() if v is not None)
        return f"{name}={value}"

    def target(self, neuron_map: NeuronMap, total_parameters: int) -> tuple[str, float]:
        """``("neurons", k)`` or ``("params", p)``, checked against what the candidates can hold."""
        if self.num_neurons is not None:
            if self.num_neurons > neuron_map.num_candidates:
                raise UsageError(
                    f"num_neurons={self.num_neurons} exceeds the {neuron_map.num_candidates} candidate neurons of "
                    f"this model (neuron_unit={neuron_map.unit!r}: {neuron_map.describe_candidate()}); lower it or "
                    "use neuron_ratio."
                )
            return "neurons", float(self.num_neurons)
        if self.neuron_ratio is not None:
            return "neurons", float(max(1, round(self.neuron_ratio * neuron_map.num_candidates)))
        wanted = self.param_ratio * total_parameters
        available = neuron_map.candidate_parameters
        if wanted > available:
            raise UsageError(
                f"param_ratio={self.param_ratio} asks for {wanted:,.0f} parameters, but the candidate neurons hold "
                f"only {available:,} ({available / total_parameters:.1%} of the model). Use param_ratio <= "
                f"{available / total_parameters:.4f}, or add gate_proj neurons (include_gate=True) or attention "
                "neurons (neuron_targets='mlp,attention')."
            )
        return "params", wanted


def validate_scores(neuron_map: NeuronMap, scores: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Check a selector's output: one finite float score per candidate of every group."""
    keys = [g.key for g in neuron_map.groups]
    if not isinstance(scores, Mapping) or set(scores) != set(keys):
        got = sorted(scores)[:3] if isinstance(scores, Mapping) else type(scores).__name__
        raise ValueError(
            f"Selector {source!r} returned scores for {len(scores) if isinstance(scores, Mapping) else '?'} groups "
            f"(e.g. {got}), expected {len(keys)} (one per {neuron_map.unit} group, e.g. {keys[:2]}). "
            "Return a dict keyed by NeuronGroup.key."
        )
    checked = {}
    for group in neuron_map.groups:
        s = scores[group.key]
        if not torch.is_tensor(s) or s.shape != (group.size,):
            shape = tuple(s.shape) if torch.is_tensor(s) else type(s).__name__
            raise ValueError(f"Selector {source!r} returned scores of shape {shape} for {group.key!r}, "
                             f"expected ({group.size},).")
        s = s.detach().float().cpu()
        if not torch.isfinite(s).all():
            raise ValueError(f"Selector {source!r} returned NaN or infinite scores for {group.key!r}.")
        checked[group.key] = s
    return checked


def select_top(
    neuron_map: NeuronMap,
    scores: Mapping[str, torch.Tensor],
    budget: Budget,
    total_parameters: int,
    keep: str = "lowest",
    scope: str = "global",
    metadata: Mapping[str, str] | None = None,
    excluded: Mapping[str, torch.Tensor] | None = None,
    excluded_by: str = "the exclusion",
) -> NeuronMask:
    """Rank validated scores and keep the best candidates within the budget (ties: lower index first).

    ``excluded`` (group key -> bool per candidate) marks candidates that are never kept (``protect_ratio``); the
    budget still counts shares of all candidates, so protection changes which neurons are trained, not how many.
    ``excluded_by`` names the setting that excluded them, for the message when too few candidates are left.
    """
    if keep not in ("lowest", "highest"):
        raise ValueError(f"keep must be 'lowest' or 'highest', got {keep!r}.")
    if scope not in SCOPES:
        raise ValueError(f"neuron_scope={scope!r} is not one of {SCOPES}.")
    kind, amount = budget.target(neuron_map, total_parameters)
    if scope == "per_expert" and not neuron_map.num_experts:
        raise ValueError("neuron_scope='per_expert' needs a mixture-of-experts model; this one has no routed experts: "
                         "use 'global' or 'per_layer'.")
    pools = [neuron_map.groups] if scope == "global" else _pools(neuron_map.groups, scope)
    share = amount / (neuron_map.num_candidates if kind == "neurons" else neuron_map.candidate_parameters)
    target = round(amount) if kind == "neurons" else amount  # a count budget is a whole number of neurons
    ranked = [_RankedPool(pool, scores, keep == "highest", kind, excluded) for pool in pools]
    for pool in ranked:
        pool.check_room(target if scope == "global" else share * pool.capacity, excluded_by)
    if scope == "global":
        ranked[0].fill(target)
    else:
        for pool in ranked:
            pool.fill(share * pool.capacity)
        _apportion_leftover(ranked, target)
    chosen = {}
    for pool in ranked:
        chosen.update(pool.chosen())
    meta = {"budget": str(budget), "keep": keep, "neuron_scope": scope, **(metadata or {})}
    return NeuronMask.from_groups(neuron_map, chosen, meta)


class _RankedPool:
    """One pool's candidates in rank order and how many of them are taken; ``units`` per candidate: 1 for a
    count budget, its parameters for a parameter budget."""

    def __init__(self, groups: list[NeuronGroup], scores: Mapping[str, torch.Tensor], highest: bool, kind: str,
                 excluded: Mapping[str, torch.Tensor] | None = None):
        self.groups, self.highest = groups, highest
        self.flat = torch.cat([scores[g.key] for g in groups])
        order = torch.sort(self.flat, descending=highest, stable=True).indices
        barred = torch.cat([excluded[g.key] for g in groups]) if excluded else torch.zeros(len(order), dtype=torch.bool)
        self.order = order[torch.sort(barred[order].byte(), stable=True).indices]  # excluded last, rank order kept
        self.eligible = int((~barred).sum())
        sizes = torch.cat([torch.full((g.size,), g.params_per_neuron, dtype=torch.float64) for g in groups])
        self.units = torch.ones_like(sizes) if kind == "neurons" else sizes[self.order]
        self.capacity = float(self.units.sum())  # of all candidates: a share of the pool counts the excluded too
        self.quota = 0.0
        self.taken = 0

    def check_room(self, quota: float, excluded_by: str) -> None:
        """Excluded candidates must leave room for the pool's part of the budget."""
        room = float(self.units[: self.eligible].sum())
        if quota > room + 1e-6:
            where = self.groups[0].key if len(self.groups) == 1 else f"{self.groups[0].key} .. {self.groups[-1].key}"
            raise UsageError(f"The budget asks {quota / self.capacity:.1%} of the candidates of {where}, but "
                             f"{excluded_by} leaves only {room / self.capacity:.1%} of them selectable: lower "
                             f"{excluded_by} or the budget.")

    def fill(self, quota: float) -> None:
        """Take the longest prefix of the ranking whose units fit in ``quota`` (excluded candidates never)."""
        self.quota = quota
        self.taken = min(self.eligible, int((torch.cumsum(self.units, 0) <= quota + 1e-6).sum()))

    @property
    def used(self) -> float:
        return float(self.units[: self.taken].sum())

    @property
    def next_units(self) -> float:
        """Units of the best candidate not taken yet (infinite when none is left)."""
        return float(self.units[self.taken]) if self.taken < self.eligible else math.inf

    @property
    def next_rank_key(self) -> float:
        """Sorts the pools' next candidates best first, whichever way the scores rank."""
        score = float(self.flat[self.order[self.taken]])
        return -score if self.highest else score

    def chosen(self) -> dict[str, torch.Tensor]:
        keep = torch.zeros(self.flat.numel(), dtype=torch.bool)
        keep[self.order[: self.taken]] = True
        return dict(zip([g.key for g in self.groups], keep.split([g.size for g in self.groups]), strict=True))


def _apportion_leftover(pools: list[_RankedPool], amount: float) -> None:
    """Give what each pool's share left over to the pools whose share was cut most (largest remainder).

    Each pool took what fits in its exact share, so the pools together fall short of the budget by less than
    one candidate per pool; the rest goes one candidate at a time to the pools with the largest unfilled
    fraction of a candidate, ties to the better-scored candidate. A count budget is then met exactly (7
    neurons over 2 layers: 4 + 3), a parameter budget to within one neuron, as with one global pool.
    """
    open_pools = [p for p in pools if p.next_units < math.inf]
    open_pools.sort(key=lambda p: (-(p.quota - p.used) / p.next_units, p.next_rank_key))
    left = amount - sum(p.used for p in pools)
    for pool in open_pools:
        if pool.next_units <= left + 1e-6:
            left -= pool.next_units
            pool.taken += 1


def _pools(groups: list[NeuronGroup], scope: str) -> list[list[NeuronGroup]]:
    """Groups pooled per layer, per role (a tied ``mlp`` unit's roles together, e.g. ``up+down``), or per
    (layer, expert) where a layer's non-expert MLP is a pool of its own."""
    pools: dict[object, list[NeuronGroup]] = {}
    for g in groups:
        if scope == "per_role":
            key: object = "+".join(p.role for p in g.projections)
        else:
            key = (g.layer, g.expert if scope == "per_expert" else None)
        pools.setdefault(key, []).append(g)
    return list(pools.values())
