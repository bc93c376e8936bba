"""``NeuronMask``: which neurons of which projection are trained, with set algebra and safetensors I/O.

The mask is the hand-off between selection and training: a selector's scores become a mask, and a
training mode (gradient hooks or deltas) only ever reads a mask. It is keyed by the projection's module
name, one boolean vector per projection, so it can be saved, inspected, combined and reused across runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write
from .errors import MissingFileError, UsageError
from .neurons import NeuronMap

MASK_FILENAME = "neuron_mask.safetensors"


class NeuronMask:
    """Selected neurons per projection.

    Args:
        selected: module name -> bool tensor ``[num_neurons]``.
        info: module name -> ``{"layer": int, "role": str, "params_per_neuron": int}``, plus ``"expert": int``
            for a routed expert's projection (its masks are saved with the expert dimension that way).
        metadata: free-form string facts (model type, selector, budget...) saved with the mask.
    """

    def __init__(
        self,
        selected: Mapping[str, torch.Tensor],
        info: Mapping[str, Mapping[str, int | str]],
        metadata: Mapping[str, str] | None = None,
    ):
        if selected.keys() != info.keys():
            raise ValueError("NeuronMask: `selected` and `info` must name the same projections.")
        # a copy per projection: an `mlp` unit ties projections to one choice, yet each must save on its own
        self.selected = {name: t.detach().to("cpu", torch.bool).reshape(-1).clone() for name, t in selected.items()}
        self.info = {name: dict(v) for name, v in info.items()}
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}

    @classmethod
    def from_groups(
        cls, neuron_map: NeuronMap, chosen: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> NeuronMask:
        """Expand a choice per ranked group (``NeuronGroup.key`` -> bool) to every projection of the group."""
        selected, info = {}, {}
        for group in neuron_map.groups:
            for proj in group.projections:
                selected[proj.name] = chosen[group.key]
                info[proj.name] = {"layer": proj.layer, "role": proj.role, "params_per_neuron": proj.params_per_neuron}
                if proj.expert is not None:
                    info[proj.name]["expert"] = proj.expert
        experts = {"num_experts": str(neuron_map.num_experts)} if neuron_map.num_experts else {}
        meta = {
            "model_type": neuron_map.model_type,
            "num_layers": str(neuron_map.num_layers),
            "intermediate_size": str(neuron_map.intermediate_size),
            "neuron_unit": neuron_map.unit,
            **experts,
            **(metadata or {}),
        }
        return cls(selected, info, meta)

    # -- counts ---------------------------------------------------------------------------------------
    @property
    def num_selected(self) -> int:
        """Selected neuron vectors, counted per projection (a tied ``mlp`` unit counts once per projection)."""
        return int(sum(t.sum().item() for t in self.selected.values()))

    @property
    def num_total(self) -> int:
        return sum(t.numel() for t in self.selected.values())

    @property
    def trainable_parameters(self) -> int:
        return int(sum(t.sum().item() * self.info[n]["params_per_neuron"] for n, t in self.selected.items()))

    def per_layer_role_counts(self, candidates: bool = False) -> dict[int, dict[str, int]]:
        """``{layer: {role: selected neuron vectors}}`` in layer order; ``candidates``: how many it chose from."""
        counts: dict[int, dict[str, int]] = {}
        for name, t in self.selected.items():
            roles = counts.setdefault(int(self.info[name]["layer"]), {})
            role = str(self.info[name]["role"])
            roles[role] = roles.get(role, 0) + (t.numel() if candidates else int(t.sum().item()))
        return dict(sorted(counts.items()))

    def per_layer_counts(self) -> dict[int, int]:
        """``{layer: selected neuron vectors}`` over every role, in layer order."""
        return {layer: sum(roles.values()) for layer, roles in self.per_layer_role_counts().items()}

    def per_expert_counts(self) -> dict[int, dict[int, int]]:
        """``{layer: {expert: selected neuron vectors}}`` over routed experts (empty for a dense model)."""
        counts: dict[int, dict[int, int]] = {}
        for name, t in self.selected.items():
            expert = self.info[name].get("expert")
            if expert is None:
                continue
            per_layer = counts.setdefault(int(self.info[name]["layer"]), {})
            per_layer[int(expert)] = per_layer.get(int(expert), 0) + int(t.sum().item())
        return {layer: dict(sorted(c.items())) for layer, c in sorted(counts.items())}

    def per_module_counts(self) -> dict[str, int]:
        return {name: int(t.sum().item()) for name, t in self.selected.items()}

    def indices(self, name: str) -> torch.Tensor:
        """Sorted indices of the selected neurons of one projection."""
        return self.selected[name].nonzero().flatten()

    # -- algebra ----------------------------------------------------------------------------------------
    def _combine(self, other: NeuronMask, op) -> NeuronMask:
        self._check_same_layout(other)
        merged = {name: op(t, other.selected[name]) for name, t in self.selected.items()}
        return NeuronMask(merged, self.info, {**self.metadata, "selector": "combined"})

    def __or__(self, other: NeuronMask) -> NeuronMask:
        return self._combine(other, torch.logical_or)

    def __and__(self, other: NeuronMask) -> NeuronMask:
        return self._combine(other, torch.logical_and)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NeuronMask) or self.selected.keys() != other.selected.keys():
            return False
        return all(torch.equal(t, other.selected[n]) for n, t in self.selected.items())

    __hash__ = None  # type: ignore[assignment]

    def overlap(self, other: NeuronMask) -> float:
        """Share of this mask's neurons that ``other`` selects too (the paper's Table 6)."""
        return (self & other).num_selected / max(self.num_selected, 1)

    def jaccard(self, other: NeuronMask) -> float:
        """|A & B| / |A | B|: a symmetric overlap."""
        return (self & other).num_selected / max((self | other).num_selected, 1)

    # -- compatibility ----------------------------------------------------------------------------------
    def shape(self) -> dict[str, int]:
        return {name: t.numel() for name, t in self.selected.items()}

    def check_fits(self, neuron_map: NeuronMap) -> None:
        """Raise a ValueError that names both shapes when this mask was made for another model or layout."""
        wanted = {p.name: p.num_neurons for p in neuron_map.projections}
        if wanted == self.shape():
            return
        experts = f", {neuron_map.num_experts} experts per layer" if neuron_map.num_experts else ""
        self._raise_mismatch(
            wanted,
            f"this model ({neuron_map.model_type}, {neuron_map.num_layers} layers{experts}, "
            f"intermediate size {neuron_map.intermediate_size})",
        )

    def _check_same_layout(self, other: NeuronMask) -> None:
        if other.shape() != self.shape():
            self._raise_mismatch(other.shape(), "the other mask", other.metadata)

    def _raise_mismatch(self, wanted: dict[str, int], what: str, meta: Mapping[str, str] | None = None) -> None:
        mine = self.shape()
        diffs = [
            f"{n}: {mine.get(n, 'absent')} in the mask vs {wanted.get(n, 'absent')}"
            for n in sorted(mine.keys() | wanted.keys())
            if mine.get(n) != wanted.get(n)
        ]
        layers = self.metadata.get("num_layers", "?")
        inter = self.metadata.get("intermediate_size", "?")
        experts = f", {self.metadata['num_experts']} experts per layer" if "num_experts" in self.metadata else ""
        raise UsageError(
            f"Neuron mask for {self.metadata.get('model_type', '?')} ({layers} layers{experts}, "
            f"intermediate size {inter}, "
            f"{len(mine)} projections) does not fit {what} ({len(wanted)} projections). Differences (neurons per "
            f"projection): {'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}. Select a new mask for "
            "this model, or build the model with the same neuron_unit/include_gate/neuron_targets settings."
        )

    # -- I/O ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write safetensors atomically (temp file, then rename): a killed save never leaves a bad mask."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".safetensors":
            path = path / MASK_FILENAME
        header = {"neft_trl.info": json.dumps(self.info), **self.metadata}
        tensors = {n: t.contiguous() for n, t in self.selected.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronMask:
        path = Path(path)
        if path.is_dir():
            path = path / MASK_FILENAME
        if not path.is_file():
            raise MissingFileError(f"No neuron mask at {str(path)!r}: pass a file saved by NeuronMask.save().")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                selected = {name: f.get_tensor(name) for name in f.keys()}
            info = json.loads(meta.pop("neft_trl.info"))
        except (KeyError, ValueError, OSError, SafetensorError) as err:
            raise UsageError(f"{str(path)!r} is not a neft_trl neuron mask ({err}).") from err
        return cls(selected, info, meta)

    def __repr__(self) -> str:
        return (
            f"NeuronMask({self.num_selected}/{self.num_total} neurons, {self.trainable_parameters:,} params, "
            f"{len(self.selected)} projections, selector={self.metadata.get('selector', '?')})"
        )

