"""The neuron map: which MLP (and, as an option, attention) projections hold neurons, and how a neuron sits in each.

A neuron (the paper's definition) is one weight vector of an MLP projection: row ``n`` of an input
projection (``up_proj``, optionally ``gate_proj``: an "in" neuron) or column ``n`` of the output
projection (``down_proj``: an "out" neuron). The map finds those projections in every decoder layer,
for any architecture in ``ARCHITECTURES`` or any MLP described by ``neuron_modules``.

Attention projections are candidates too with ``targets=("mlp", "attention")`` (``attention.py``): rows of
q/k/v (or a fused qkv) and columns of o, roles ``"q"``, ``"k"``, ``"v"``, ``"qkv"``, ``"o"``.

``NeuronGroup`` is the unit that is scored and ranked: one projection's neurons (``unit="vector"``, the
paper) or all projections of one MLP tied by index (``unit="mlp"``, the MLP's channel: the default of ``NeFTConfig``
and ``select_neurons``; in an attention module, the projections of equal width are tied: q with o, and k with v
under grouped-query attention).

Mixture-of-experts layers: each routed expert is an MLP of its own, so a candidate is (layer, expert, role,
index). Fused 3-D experts (transformers 5) are reached through expert views (``experts.py``); per-expert
``nn.Linear`` MLPs (transformers 4.x, ``...experts.<e>``) are found like any MLP and tagged with their expert.
A shared expert is an ordinary MLP of its layer (``expert`` is None). Layers are numbered by the decoder layer
a module sits in (the first numeric component of its name), so a layer's experts share its number.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .attention import (
    DEFAULT_TARGETS,
    INPUT_ROLES,
    attention_layouts,
    match_attention,
    no_attention_error,
    ordered_roles,
    parse_targets,
)
from .errors import UsageError
from .experts import check_experts_quantized, expert_views, install_expert_views
from .layers import features, is_supported_layer, is_transposed

#: Known MLP layouts: child names of the MLP module for the roles ``up``, ``gate`` (optional) and ``down``.
ARCHITECTURES: dict[str, dict[str, str]] = {
    "llama-style (Llama, Mistral, Qwen2, Gemma, SmolLM)": {"up": "up_proj", "gate": "gate_proj", "down": "down_proj"},
    "gpt2": {"up": "c_fc", "down": "c_proj"},
    "gpt-neox / falcon / bloom": {"up": "dense_h_to_4h", "down": "dense_4h_to_h"},
    "phi / opt": {"up": "fc1", "down": "fc2"},
    "gpt-j": {"up": "fc_in", "down": "fc_out"},
    "mixtral experts (transformers 4.x)": {"up": "w3", "gate": "w1", "down": "w2"},
}

UNITS = ("vector", "mlp")
#: What ``NeFTConfig`` and ``select_neurons`` rank by default: whole MLP channels (see the README's Results).
DEFAULT_NEURON_UNIT = "mlp"


@dataclass(frozen=True, eq=False)
class Projection:
    """One MLP projection that holds neurons.

    ``is_input`` projections (up/gate) hold "in" neurons, one per output feature; the output projection
    (down) holds "out" neurons, one per input feature. ``neuron_dim`` is the dimension of the *stored*
    weight that indexes neurons, so ``weight.select(neuron_dim, n)`` is neuron ``n`` for every layer class.
    """

    name: str
    module: nn.Module
    role: str
    layer: int
    is_input: bool
    expert: int | None = None  # the routed expert this projection belongs to (None: a dense or shared MLP)

    @property
    def mlp_name(self) -> str:
        """The MLP (or expert, or attention module) this projection belongs to: its parent module's name."""
        return self.name.rsplit(".", 1)[0]

    @property
    def is_attention(self) -> bool:
        return self.role in (*INPUT_ROLES, "o")

    @property
    def num_neurons(self) -> int:
        in_features, out_features = features(self.module)
        return out_features if self.is_input else in_features

    @property
    def vector_size(self) -> int:
        in_features, out_features = features(self.module)
        return in_features if self.is_input else out_features

    @property
    def neuron_dim(self) -> int:
        return int(self.is_input) ^ 1 ^ int(is_transposed(self.module))

    @property
    def trains_bias(self) -> bool:
        """An in-neuron's bias element belongs to it; the output projection's bias is shared by all neurons."""
        return self.is_input and getattr(self.module, "bias", None) is not None

    @property
    def params_per_neuron(self) -> int:
        return self.vector_size + int(self.trains_bias)


@dataclass(frozen=True)
class NeuronGroup:
    """The unit of ranking: ``size`` candidates, each made of the same index in every listed projection."""

    key: str
    layer: int
    projections: tuple[Projection, ...]
    expert: int | None = None

    @property
    def size(self) -> int:
        return self.projections[0].num_neurons

    @property
    def params_per_neuron(self) -> int:
        return sum(p.params_per_neuron for p in self.projections)


class NeuronMap:
    """All neuron-holding projections of a model, in layer order, and their grouping into ranked units."""

    def __init__(self, projections: list[Projection], unit: str = "vector", model_type: str = "unknown"):
        if unit not in UNITS:
            raise ValueError(f"neuron_unit={unit!r} is not one of {UNITS}.")
        self.projections = projections
        self.unit = unit
        self.model_type = model_type
        self.by_name = {p.name: p for p in projections}
        if unit == "vector":
            self.groups = [NeuronGroup(p.name, p.layer, (p,), p.expert) for p in projections]
        else:
            self.groups = _tied_groups(projections)

    @property
    def num_layers(self) -> int:
        return len({p.layer for p in self.projections})

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (the most of any layer); 0 for a dense model."""
        per_layer: dict[int, set[int]] = {}
        for p in self.projections:
            if p.expert is not None:
                per_layer.setdefault(p.layer, set()).add(p.expert)
        return max((len(e) for e in per_layer.values()), default=0)

    @property
    def intermediate_size(self) -> int:
        """The widest MLP projection's neuron count (the MLP's intermediate size); attention is not counted."""
        return max((p.num_neurons for p in self.projections if not p.is_attention),
                   default=max(p.num_neurons for p in self.projections))

    @property
    def targets(self) -> tuple[str, ...]:
        """Where the candidates come from: ``("mlp",)``, ``("attention",)`` or both."""
        kinds = {"attention" if p.is_attention else "mlp" for p in self.projections}
        return tuple(t for t in ("mlp", "attention") if t in kinds)

    @property
    def num_candidates(self) -> int:
        return sum(g.size for g in self.groups)

    def describe_candidate(self) -> str:
        """What one counted candidate is, for messages that count them (masks and reports count neuron vectors)."""
        if self.unit == "vector":
            return "one candidate is one neuron vector"
        ties = dict.fromkeys("+".join(p.role for p in g.projections) for g in self.groups)
        return f"one candidate is index n of {' / '.join(ties)} taken together, counted once"

    @property
    def candidate_parameters(self) -> int:
        return sum(g.size * g.params_per_neuron for g in self.groups)

    def __iter__(self) -> Iterator[Projection]:
        return iter(self.projections)

    def __len__(self) -> int:
        return len(self.projections)


def build_neuron_map(
    model: nn.Module,
    unit: str = "vector",
    include_gate: bool = False,
    neuron_modules: Mapping[str, str] | None = None,
    targets: str | tuple[str, ...] | list[str] | None = DEFAULT_TARGETS,
    attention_modules: Mapping[str, str] | None = None,
) -> NeuronMap:
    """Find every decoder layer's MLP projections (every routed expert of MoE layers) and, if asked, attention's.

    An MLP is a module with children named as one of ``ARCHITECTURES`` (or as ``neuron_modules``, e.g.
    ``{"up": "w1", "gate": "w3", "down": "w2"}``). Fused 3-D experts get expert views installed (see
    ``experts.py``; the model computes through them from then on). ``targets`` (``"mlp"``, ``"attention"``
    or both) says which modules hold candidates; attention modules are found by ``attention.py``'s layouts
    (or ``attention_modules``). ``lm_head`` and embeddings are never part of the map; 3-D expert weights the
    map cannot cover are an error, never silently left out, and so is an asked-for target that is not found.
    """
    targets = parse_targets(targets)
    layouts = [dict(neuron_modules)] if neuron_modules else list(ARCHITECTURES.values())
    for layout in layouts:
        if not {"up", "down"} <= layout.keys() or not layout.keys() <= {"up", "gate", "down"}:
            raise UsageError(f"neuron_modules={layout!r} must map 'up', 'down' and optionally 'gate' to child names.")
    if "mlp" not in targets:
        layouts = []
    attention = attention_layouts(attention_modules) if "attention" in targets else []
    fused = dict(install_expert_views(model)) if "mlp" in targets else {}
    check_experts_quantized(model, fused)
    layers: dict[str, int] = {}
    projections: list[Projection] = []
    for mlp_name, mlp in model.named_modules():
        if mlp_name in fused:
            layer = layers.setdefault(_layer_key(mlp_name), len(layers))
            projections.extend(Projection(name, view, view.role, layer, view.role != "down", view.expert)
                               for name, view in expert_views(mlp_name, mlp, include_gate))
            continue
        layout = next((lay for lay in layouts if _matches(mlp, lay)), None)
        if layout is None:
            attention_layout = match_attention(mlp, attention)
            if attention_layout is not None:
                layer = layers.setdefault(_layer_key(mlp_name), len(layers))
                children = {role: attention_layout[role] for role in ordered_roles(attention_layout)}
                projections.extend(Projection(f"{mlp_name}.{child}", getattr(mlp, child), role, layer, role != "o")
                                   for role, child in children.items())
            continue
        layer = layers.setdefault(_layer_key(mlp_name), len(layers))
        expert = re.search(r"(?:^|\.)experts\.(\d+)$", mlp_name)
        expert = int(expert.group(1)) if expert else None
        has_gate = "gate" in layout and is_supported_layer(getattr(mlp, layout["gate"], None))
        roles = ["up", "gate", "down"] if include_gate and has_gate else ["up", "down"]
        found = [
            Projection(f"{mlp_name}.{layout[role]}", getattr(mlp, layout[role]), role, layer, role != "down", expert)
            for role in roles
        ]
        sizes = {p.num_neurons for p in found}
        if len(sizes) != 1:
            shapes = {p.name: tuple(p.module.weight.shape) for p in found}
            raise ValueError(f"MLP {mlp_name!r} has projections of inconsistent intermediate sizes: {shapes}.")
        projections.extend(found)
    _check_experts_covered(model, fused)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if "mlp" in targets and not any(not p.is_attention for p in projections):
        known = "; ".join(f"{arch}: {lay}" for arch, lay in ARCHITECTURES.items())
        raise UsageError(
            f"Could not find MLP projections in model type {model_type!r}. Known layouts: {known}. "
            "Set `neuron_modules` (NeFTConfig / build_neuron_map) to the child names of your MLP, "
            'e.g. neuron_modules={"up": "w1", "gate": "w3", "down": "w2"}.'
        )
    if "attention" in targets and not any(p.is_attention for p in projections):
        raise no_attention_error(model_type)
    return NeuronMap(projections, unit, getattr(getattr(model, "config", None), "model_type", "unknown"))


def _tied_groups(projections: list[Projection]) -> list[NeuronGroup]:
    """``unit="mlp"``: the projections of one module tied by index, where their neuron counts agree.

    An MLP's projections all have the intermediate size (checked when the map is built), so an MLP is one
    group keyed by its name. An attention module's widths differ (GQA: k/v narrower than q/o; GPT-2: the fused
    qkv is three times o), so its projections are tied per width and keyed ``<module>.<role>+<role>``.
    """
    by_module: dict[str, dict[int, list[Projection]]] = {}
    for p in projections:
        by_module.setdefault(p.mlp_name, {}).setdefault(p.num_neurons, []).append(p)
    groups = []
    for name, by_size in by_module.items():
        for projs in by_size.values():
            key = name if len(by_size) == 1 else f"{name}.{'+'.join(p.role for p in projs)}"
            groups.append(NeuronGroup(key, projs[0].layer, tuple(projs), projs[0].expert))
    return groups


def _layer_key(name: str) -> str:
    """The decoder layer a module sits in: its name up to the first numeric component (``model.layers.3``)."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    return ".".join(parts[: index + 1])


def _check_experts_covered(model: nn.Module, fused: Mapping[str, nn.Module]) -> None:
    """3-D expert weights outside the fused experts the map covers would be left out silently: an error instead."""
    covered = {id(p) for experts in fused.values() for p in experts.parameters()}
    left_out = [name for name, p in model.named_parameters()
                if p.ndim == 3 and "expert" in name.lower() and id(p) not in covered]
    if left_out:
        raise ValueError(
            f"{len(left_out)} expert weights are stored in a layout the neuron map does not know "
            f"({', '.join(left_out[:3])}{' ...' if len(left_out) > 3 else ''}): their neurons would be left out. NeFT "
            "finds fused experts named gate_up_proj [E, 2I, H] and down_proj [E, H, I] (transformers 5) and "
            "per-expert MLPs (neuron_modules for their child names); convert the experts to one of these layouts."
        )


def _matches(module: nn.Module, layout: Mapping[str, str]) -> bool:
    return all(is_supported_layer(getattr(module, layout[role], None)) for role in ("up", "down"))


def neuron_vectors(projection: Projection, weight: torch.Tensor) -> torch.Tensor:
    """``[num_neurons, vector_size]`` view of a dense ``[out, in]`` weight: one row per neuron."""
    return weight if projection.is_input else weight.t()
