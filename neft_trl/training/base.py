"""What a training mode is: the way a ``NeuronMask`` becomes trainable parameters in a model.

Two modes implement this: ``hooks`` (full-precision weights train, gradient hooks zero the
non-selected neurons) and ``delta`` (base weights stay frozen, small per-neuron deltas train). The trainer
only talks to this interface, so it never knows which mode runs, and a mode never knows which selector
chose its neurons.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ..freezing import FrozenFlags
from ..mask import MASK_FILENAME, NeuronMask
from ..neurons import NeuronMap
from ..sharding import writes_files


class NeuronTraining(ABC):
    """A mask applied to a model. ``attach`` wires it in; ``detach`` leaves the model as it found it."""

    mode: str = ""
    #: True where ``save`` writes the trained result instead of the full model (delta mode).
    saves_model_itself: bool = False

    def __init__(self, model: nn.Module, neuron_map: NeuronMap, mask: NeuronMask):
        mask.check_fits(neuron_map)
        self.model = model
        self.neuron_map = neuron_map
        self.mask = mask
        self._frozen = FrozenFlags()

    def freeze_model(self) -> None:
        """Freeze every parameter, remembering the flags so ``detach`` can restore them."""
        self._frozen.freeze(self.model)

    def unfreeze_model(self) -> None:
        """Give every parameter the flag it had at ``freeze_model`` (a no-op when the model is not frozen)."""
        self._frozen.restore()

    @abstractmethod
    def attach(self) -> None:
        """Make exactly the selected neurons trainable."""

    @abstractmethod
    def detach(self) -> None:
        """Undo ``attach`` (hooks removed, wrappers unwrapped, flags restored)."""

    @abstractmethod
    def no_decay_parameter_names(self) -> set[str]:
        """Parameter names that must stay out of the optimizer's weight-decay group."""

    def install_weight_decay(self, optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
        """Apply this mode's own weight decay where the optimizer's would move frozen neurons (default: none)."""
        return None

    def trainable_parameter_count(self) -> int:
        return self.mask.trainable_parameters

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters an optimizer must hold: every one this mode made trainable (nothing else is)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def make_optimizer(
        self, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, weight_decay: float = 0.0, **kwargs: Any
    ) -> torch.optim.Optimizer:
        """An optimizer over the trainable neurons that never moves a frozen one, for custom training loops.

        Biases and the names in ``no_decay_parameter_names`` go to a group without weight decay (the Trainer's
        rule); ``install_weight_decay`` then adds this mode's own decay where the optimizer's would touch
        frozen neurons (hooks mode). ``kwargs`` go to ``optimizer_cls`` (``lr=...``).
        """
        excluded = self.no_decay_parameter_names()
        decay, no_decay = [], []
        for name, param in self.named_trainable_parameters():
            (no_decay if name in excluded or name.endswith("bias") else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = optimizer_cls([g for g in groups if g["params"]], **kwargs)
        self.install_weight_decay(optimizer, weight_decay)
        return optimizer

    def merge(self) -> nn.Module:
        """Leave the trained neurons in plain weights and detach: the model then trains and saves as usual."""
        self.detach()
        return self.model

    def save(self, output_dir: str | os.PathLike) -> None:
        """Write the neuron mask, then this mode's trained state (``save_trained``), into ``output_dir``.

        The mask goes first, so a folder that holds trained weights always holds the mask they were trained on.
        In a multi-process job only rank 0 writes; under ``fully_shard`` call it on every rank (the deltas are
        gathered from all of them).
        """
        write = writes_files()
        if write:
            self.mask.save(os.path.join(output_dir, MASK_FILENAME))
        self.save_trained(output_dir, write=write)

    def save_trained(self, output_dir: str | os.PathLike, write: bool = True) -> None:
        """The trained state alone: the full model (``save_pretrained``) where the weights themselves trained.

        ``write=False``: take part in what saving needs from every rank (gathering sharded deltas), write nothing.
        """
        if not write:
            return
        if not hasattr(self.model, "save_pretrained"):
            raise TypeError(f"{type(self.model).__name__} has no save_pretrained(): save model.state_dict() with "
                            "safetensors yourself, or use neft_mode='delta' (which saves only the neurons).")
        self.model.save_pretrained(output_dir)
