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
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import __version__
from ..layers import features
from ..mask import NeuronMask
from ..neurons import NeuronMap
from .base import NeuronTraining
from .delta_io import DELTA_FILENAME, check_delta_fits, read_neuron_delta, save_neuron_delta
from .delta_layer import NeuronDelta, attach_delta, detach_delta


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
        for name in self.deltas:
            detach_delta(self.neuron_map.by_name[name].module)
        self.deltas = {}
        self.unfreeze_model()

    def no_decay_parameter_names(self) -> set[str]:
        """None: decay on a delta pulls toward the pretrained weight, which is the chosen behaviour (see module)."""
        return set()

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for d in self.deltas.values() for p in d.parameters())

    def save(self, output_dir: str) -> None:
        """``neft_delta.safetensors`` + ``neft_delta_config.json`` (the trainer adds the neuron mask)."""
        config = getattr(self.model, "config", None)
        save_neuron_delta(self.deltas, output_dir, {
            "base_model_name_or_path": getattr(config, "_name_or_path", None),
            "base_model_revision": getattr(config, "_commit_hash", None),
            "model_type": self.neuron_map.model_type,
            "neft_mode": self.mode,
            "budget": self.mask.metadata.get("budget"),
            "selector": self.mask.metadata.get("selector"),
            "selected_neurons": self.mask.num_selected,
            "trainable_parameters": self.trainable_parameter_count(),
            "delta_dtype": str(self.dtype).removeprefix("torch."),
            "neft_trl_version": __version__,
        })

    @torch.no_grad()
    def load(self, path: str | os.PathLike) -> None:
        """Copy saved delta values (a checkpoint of this run) into the attached deltas, e.g. to resume."""
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
            delta.weight.copy_(saved[name].weight)
            if delta.bias is not None:
                delta.bias.copy_(saved[name].bias)
