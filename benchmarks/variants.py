"""Ablation variants of a NeFT method, written into its name: ``neft-delta-cosine+probe20+attn``.

Each ``+variant`` changes one setting against the method's defaults, so an ablation row is one name on the
command line and its result file says what it ran. The budget (``--param_ratio``) never changes, so every
variant trains the same number of parameters as its plain method (and as LoRA at the matched rank).

* ``probe<P>`` (cosine): the probe runs ``P`` percent of the run's steps (at least 1), e.g. ``probe1``, ``probe20``;
* ``fullprobe`` / ``sketchprobe`` (cosine): the paper's full-size probe / the memory-bounded sketch probe (default);
* ``taylor`` / ``norm`` (gradient): importance ``|w . g|`` (the default) / ``||g||``;
* ``mlpunit`` / ``vectorunit``: ``neuron_unit="mlp"`` (the default: row n of up and column n of down ranked as one
  unit, the MLP's channel n) / ``"vector"`` (the paper: every row and column ranked on its own);
* ``gate``: ``include_gate=True``, gate rows are candidates too (with ``mlpunit``: the whole SwiGLU channel);
* ``perrole`` / ``perlayer`` / ``global``: ``neuron_scope="per_role"`` (the same share of up rows and of down
  columns) / ``"per_layer"`` (the default: the same share in every layer) / ``"global"`` (the paper: one pool);
* ``attn``: ``neuron_targets="mlp,attention"``, q/k/v rows and o columns are candidates too;
* ``protect<P>``: ``protect_ratio=P/100``, each layer's P percent most active channels are never selected, e.g.
  ``protect5`` (``protect0``: none).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

_PROBE_SHARE = re.compile(r"probe(\d+(?:\.\d+)?)")
_PROTECT_SHARE = re.compile(r"protect(\d+(?:\.\d+)?)")
#: variant -> (selectors it applies to (None: any), NeFTConfig fields, selector kwargs)
_FIXED: dict[str, tuple[tuple[str, ...] | None, dict[str, Any], dict[str, Any]]] = {
    "fullprobe": (("cosine",), {}, {"probe": "full"}),
    "sketchprobe": (("cosine",), {}, {"probe": "sketch"}),
    "taylor": (("gradient",), {}, {"importance": "taylor"}),
    "norm": (("gradient",), {}, {"importance": "norm"}),
    "mlpunit": (None, {"neuron_unit": "mlp"}, {}),
    "vectorunit": (None, {"neuron_unit": "vector"}, {}),
    "gate": (None, {"include_gate": True}, {}),
    "perrole": (None, {"neuron_scope": "per_role"}, {}),
    "perlayer": (None, {"neuron_scope": "per_layer"}, {}),
    "global": (None, {"neuron_scope": "global"}, {}),
    "attn": (None, {"neuron_targets": "mlp,attention"}, {}),
}
VARIANTS = (*_FIXED, "probe<P>", "protect<P>")


@dataclass(frozen=True)
class Overrides:
    """What a method's variants change: ``NeFTConfig`` fields and selector keyword arguments."""

    config: dict[str, Any] = field(default_factory=dict)
    selector_kwargs: dict[str, Any] = field(default_factory=dict)


def check_variant(variant: str, selector: str) -> None:
    """A ValueError naming the valid variants if ``variant`` is unknown or does not apply to ``selector``."""
    if _PROBE_SHARE.fullmatch(variant):
        selectors: tuple[str, ...] | None = ("cosine",)
    elif _PROTECT_SHARE.fullmatch(variant):
        selectors = None
    elif variant in _FIXED:
        selectors = _FIXED[variant][0]
    else:
        raise ValueError(f"Unknown method variant {variant!r}. Variants: {', '.join(VARIANTS)} "
                         "(see benchmarks/variants.py).")
    if selectors is not None and selector not in selectors:
        raise ValueError(f"Variant {variant!r} configures the {'/'.join(selectors)} selector, not {selector!r}.")


def overrides(variants: tuple[str, ...], max_steps: int) -> Overrides:
    """The settings ``variants`` stand for in a run of ``max_steps`` steps; two variants setting one field clash."""
    config: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    for variant in variants:
        share, protect = _PROBE_SHARE.fullmatch(variant), _PROTECT_SHARE.fullmatch(variant)
        if share:
            fields, extra = {}, {"probe_steps": max(1, math.floor(float(share.group(1)) / 100 * max_steps + 0.5))}
        elif protect:
            fields, extra = {"protect_ratio": float(protect.group(1)) / 100}, {}
        else:
            _, fields, extra = _FIXED[variant]
        for target, values in ((config, fields), (kwargs, extra)):
            clash = {k for k in values if k in target and target[k] != values[k]}
            if clash:
                raise ValueError(f"Variants {'+'.join(variants)} set {sorted(clash)} twice: keep one of them.")
            target.update(values)
    return Overrides(config, kwargs)


def merge_selector_kwargs(given: dict[str, Any], variant: dict[str, Any], method: str) -> dict[str, Any]:
    """``--selector_kwargs`` plus the variant's; the same key with two values is an error, not a silent pick."""
    clash = {k for k in variant if k in given and given[k] != variant[k]}
    if clash:
        raise ValueError(f"{method}: --selector_kwargs sets {sorted(clash)}, which its variants set too; drop one.")
    return {**given, **variant}
