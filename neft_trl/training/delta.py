"""``delta`` mode: the base weights stay frozen (quantized or not); small per-neuron deltas train.

Each projection with selected neurons gets a ``NeuronDelta`` (see ``delta_layer.py``) holding only those
neurons, added to the layer's output in forward. Every base parameter is frozen, so gradients, optimizer
state and checkpoints exist only for the deltas: memory grows with the neurons trained, not with the model,
and 4-bit/8-bit bitsandbytes layers, whose packed weights cannot take gradients, train the same way.

Weight decay: the optimizer's ordinary decoupled decay applies to the delta *weights* (bias deltas are in
the no-decay group by the Trainer's usual name rule). It therefore pulls a trained neuron back toward its
pretrained value, not toward zero, as weight decay on a LoRA adapter does; the base weights never move.
With ``weight_decay=0`` (the paper's setting) delta and hooks mode train the same weights; with decay > 0
hooks mode shrinks the whole selected weight toward zero instead.

Deltas are fp32 by default, whatever the base dtype: they are created after ``SFTTrainer.__init__``, so
TRL's bf16 cast of a quantized model's trainable parameters never reaches them.

FSDP2: attach the deltas, then ``fully_shard`` the model; FSDP2 then shards and averages them like any
trainable parameter (``sharding.py`` says what changes: gathered saves, scattered loads, no in-place merge).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .. import __version__
from ..layers import features, is_quantized, is_transposed
from ..mask import NeuronMask
from ..neurons import NeuronMap
from ..sharding import check_unsharded, copy_full_, is_sharded
from .base import NeuronTraining
from .delta_io import DELTA_FILENAME, check_delta_fits, read_neuron_delta, save_neuron_delta
from .delta_layer import DELTA_ATTRIBUTE, NeuronDelta, attach_delta, detach_delta


class DeltaTraining(NeuronTraining):
    """Train selected neurons as deltas beside frozen base weights (any layer class, any precision)."""

    mode = "delta"
    saves_model_itself = True

    def __init__(
        self, model: nn.Module, neuron_map: NeuronMap, mask: NeuronMask, dtype: torch.dtype = torch.float32
    ):
        super().__init__(model, neuron_map, mask)
        if not dtype.is_floating_point:
            raise ValueError(f"Neuron deltas need a floating-point dtype, got {dtype}.")
        self.dtype = dtype
        self.deltas: dict[str, NeuronDelta] = {}

    def attach(self) -> None:
        if self.deltas:
            raise RuntimeError("DeltaTraining.attach() called twice: call detach() first.")
        check_unsharded(self.model, "attach neuron deltas")
        self.freeze_model()
        for proj in self.neuron_map:
            index = self.mask.indices(proj.name)
            if index.numel() == 0:
                continue
            in_features, out_features = features(proj.module)
            device = proj.module.weight.device  # an expert view owns no parameter of its own
            delta = NeuronDelta(index, proj.is_input, in_features, out_features, with_bias=proj.trains_bias,
                                dtype=self.dtype, device=device)
            attach_delta(proj.module, delta)
            self.deltas[proj.name] = delta

    def detach(self) -> None:
        """Remove the deltas (the model computes its base function again) and restore requires_grad flags."""
        check_unsharded(self.model, "detach neuron deltas")
        for name in self.deltas:
            detach_delta(self.neuron_map.by_name[name].module)
        self.deltas = {}
        self.unfreeze_model()

    def no_decay_parameter_names(self) -> set[str]:
        """None: decay on a delta pulls toward the pretrained weight, which is the chosen behaviour (see module)."""
        return set()

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for d in self.deltas.values() for p in d.parameters())

    @property
    def sharded(self) -> bool:
        """True once ``fully_shard`` has split the deltas across ranks (they are DTensors)."""
        return any(is_sharded(d.weight) for d in self.deltas.values())

    @property
    def quantized(self) -> bool:
        return any(is_quantized(self.neuron_map.by_name[name].module) for name in self.deltas)

    def merge(self) -> nn.Module:
        """Fold the deltas into the full-precision weights (selected neurons only) and detach them.

        A 4/8-bit base cannot take the deltas in place: save them (``save``) and use ``merge_neuron_delta``,
        which dequantizes first.
        """
        check_unsharded(self.model, "merge neuron deltas")
        if self.quantized:
            raise ValueError("Cannot merge neuron deltas into 4/8-bit weights in place: handle.save(dir), then "
                             "neft_trl.merge_neuron_delta(base_model, dir) dequantizes the base and merges.")
        for name, delta in self.deltas.items():
            delta.merge_into(self.neuron_map.by_name[name].module)
        self.detach()
        return self.model

    @contextmanager
    def merged(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the model's state dict with the deltas folded into its weights, without the delta parameters.

        The base weights are written in place (selected slices only) for the block and restored bit-exactly
        after it, so this costs a copy of the selected neurons, not of the model.
        """
        check_unsharded(self.model, "merge neuron deltas")
        if self.quantized:
            raise ValueError("A 4/8-bit base has no full-precision weights to merge into: use merge_neuron_delta.")
        modules = {name: self.neuron_map.by_name[name].module for name in self.deltas}
        saved = {name: delta.selected_slices(modules[name]) for name, delta in self.deltas.items()}
        try:
            for name, delta in self.deltas.items():
                delta.merge_into(modules[name])
            yield {k: v for k, v in self.model.state_dict().items() if f".{DELTA_ATTRIBUTE}." not in k}
        finally:
            for name, delta in self.deltas.items():
                delta.restore_slices(modules[name], saved[name])

    def save_merged(self, output_dir: str | os.PathLike) -> None:
        """A plain HF checkpoint (deltas merged) that ``from_pretrained`` loads, e.g. beside the delta files."""
        with self.merged() as state_dict:
            self.model.save_pretrained(output_dir, state_dict=state_dict)

    def save_trained(self, output_dir: str | os.PathLike, write: bool = True) -> None:
        """``neft_delta.safetensors`` + ``neft_delta_config.json``; sharded deltas are gathered on every rank first."""
        gathered = {name: delta.full_copy() for name, delta in self.deltas.items()}  # a collective under FSDP2
        if not write:
            return
        config = getattr(self.model, "config", None)
        layouts = {is_transposed(self.neuron_map.by_name[name].module) for name in self.deltas}
        save_neuron_delta(gathered, output_dir, {
            "base_model_name_or_path": getattr(config, "_name_or_path", None),
            "base_model_revision": getattr(config, "_commit_hash", None),
            "model_type": self.neuron_map.model_type,
            "neft_mode": self.mode,
            "budget": self.mask.metadata.get("budget"),
            "selector": self.mask.metadata.get("selector"),
            "selected_neurons": self.mask.num_selected,
            "trainable_parameters": self.trainable_parameter_count(),
            "delta_dtype": str(self.dtype).removeprefix("torch."),
            # weights stored [in, out] (GPT-2 Conv1D): what a PEFT LoRA export must declare (peft_export.py)
            "fan_in_fan_out": layouts.pop() if len(layouts) == 1 else ("mixed" if layouts else None),
            "neft_trl_version": __version__,
        })

    @torch.no_grad()
    def load(self, path: str | os.PathLike) -> None:
        """Copy saved delta values (a checkpoint of this run) into the attached deltas, e.g. to resume.

        Sharded deltas (after ``fully_shard``) each keep their own shard; every rank must then load the same file.
        """
        saved, _ = read_neuron_delta(path)
        check_delta_fits(self.model, saved)
        if saved.keys() != self.deltas.keys():
            raise ValueError(
                f"{os.path.join(str(path), DELTA_FILENAME)} holds deltas for {len(saved)} projections, this run trains "
                f"{len(self.deltas)}: resume with the neuron mask saved in that checkpoint."
            )
        for name, delta in self.deltas.items():
            if not torch.equal(saved[name].index, delta.index.cpu()):
                raise ValueError(f"The saved delta of {name} holds other neurons than this run's mask selects.")
            copy_full_(delta.weight, saved[name].weight)
            if delta.bias is not None:
                copy_full_(delta.bias, saved[name].bias)
