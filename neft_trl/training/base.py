"""What a training mode is: the way a ``NeuronMask`` becomes trainable parameters in a model.

Two modes implement this: ``hooks`` (full-precision weights train, gradient hooks zero the
non-selected neurons) and ``delta`` (base weights stay frozen, small per-neuron deltas train). The trainer
only talks to this interface, so it never knows which mode runs, and a mode never knows which selector
chose its neurons.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ..mask import NeuronMask
from ..neurons import NeuronMap


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
        self._requires_grad: dict[str, bool] = {}

    def freeze_model(self) -> None:
        """Freeze every parameter, remembering the flags so ``detach`` can restore them."""
        for name, param in self.model.named_parameters():
            self._requires_grad[name] = param.requires_grad
            param.requires_grad_(False)

    def unfreeze_model(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self._requires_grad:
                param.requires_grad_(self._requires_grad[name])
        self._requires_grad.clear()

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

    def save(self, output_dir: str) -> None:
        """Write this mode's trained state to ``output_dir`` (only called when ``saves_model_itself``)."""
        return None
