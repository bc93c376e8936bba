"""The neuron map: which MLP projections hold neurons, and how a neuron sits in each weight.

A neuron (the paper's definition) is one weight vector of an MLP projection: row ``n`` of an input
projection (``up_proj``, optionally ``gate_proj``: an "in" neuron) or column ``n`` of the output
projection (``down_proj``: an "out" neuron). The map finds those projections in every decoder layer,
for any architecture in ``ARCHITECTURES`` or any MLP described by ``neuron_modules``.

``NeuronGroup`` is the unit that is scored and ranked: one projection's neurons (``unit="vector"``, the
paper) or all projections of one layer tied by index (``unit="mlp"``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError
from .layers import features, is_supported_layer, is_transposed

#: Known MLP layouts: child names of the MLP module for the roles ``up``, ``gate`` (optional) and ``down``.
ARCHITECTURES: dict[str, dict[str, str]] = {
    "llama-style (Llama, Mistral, Qwen2, Gemma, SmolLM)": {"up": "up_proj", "gate": "gate_proj", "down": "down_proj"},
    "gpt2": {"up": "c_fc", "down": "c_proj"},
    "gpt-neox / falcon / bloom": {"up": "dense_h_to_4h", "down": "dense_4h_to_h"},
    "phi / opt": {"up": "fc1", "down": "fc2"},
    "gpt-j": {"up": "fc_in", "down": "fc_out"},
}

UNITS = ("vector", "mlp")


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
            self.groups = [NeuronGroup(p.name, p.layer, (p,)) for p in projections]
        else:
            layers: dict[int, list[Projection]] = {}
            for p in projections:
                layers.setdefault(p.layer, []).append(p)
            self.groups = [
                NeuronGroup(projs[0].name.rsplit(".", 1)[0], layer, tuple(projs)) for layer, projs in layers.items()
            ]

    @property
    def num_layers(self) -> int:
        return len({p.layer for p in self.projections})

    @property
    def intermediate_size(self) -> int:
        return max(p.num_neurons for p in self.projections)

    @property
    def num_candidates(self) -> int:
        return sum(g.size for g in self.groups)

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
) -> NeuronMap:
    """Find every decoder layer's MLP projections.

    An MLP is a module with children named as one of ``ARCHITECTURES`` (or as ``neuron_modules``, e.g.
    ``{"up": "w1", "gate": "w3", "down": "w2"}``). ``lm_head`` and embeddings are never part of the map.
    """
    layouts = [dict(neuron_modules)] if neuron_modules else list(ARCHITECTURES.values())
    for layout in layouts:
        if not {"up", "down"} <= layout.keys() or not layout.keys() <= {"up", "gate", "down"}:
            raise UsageError(f"neuron_modules={layout!r} must map 'up', 'down' and optionally 'gate' to child names.")
    projections: list[Projection] = []
    for mlp_name, mlp in model.named_modules():
        layout = next((lay for lay in layouts if _matches(mlp, lay)), None)
        if layout is None:
            continue
        layer = len({p.layer for p in projections})
        has_gate = "gate" in layout and is_supported_layer(getattr(mlp, layout["gate"], None))
        roles = ["up", "gate", "down"] if include_gate and has_gate else ["up", "down"]
        found = [
            Projection(f"{mlp_name}.{layout[role]}", getattr(mlp, layout[role]), role, layer, role != "down")
            for role in roles
        ]
        sizes = {p.num_neurons for p in found}
        if len(sizes) != 1:
            shapes = {p.name: tuple(p.module.weight.shape) for p in found}
            raise ValueError(f"MLP {mlp_name!r} has projections of inconsistent intermediate sizes: {shapes}.")
        projections.extend(found)
    if not projections:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        known = "; ".join(f"{arch}: {lay}" for arch, lay in ARCHITECTURES.items())
        raise UsageError(
            f"Could not find MLP projections in model type {model_type!r}. Known layouts: {known}. "
            "Set `neuron_modules` (NeFTConfig / build_neuron_map) to the child names of your MLP, "
            'e.g. neuron_modules={"up": "w1", "gate": "w3", "down": "w2"}.'
        )
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    return NeuronMap(projections, unit=unit, model_type=model_type)


def _matches(module: nn.Module, layout: Mapping[str, str]) -> bool:
    return all(is_supported_layer(getattr(module, layout[role], None)) for role in ("up", "down"))


def neuron_vectors(projection: Projection, weight: torch.Tensor) -> torch.Tensor:
    """``[num_neurons, vector_size]`` view of a dense ``[out, in]`` weight: one row per neuron."""
    return weight if projection.is_input else weight.t()
