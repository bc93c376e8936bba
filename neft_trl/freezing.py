"""Freezing a whole model for a while and giving every parameter its own ``requires_grad`` flag back.

Three places need this: a training mode freezes the model before it makes the selected neurons trainable
(and restores the flags on ``detach``), the trainer freezes a quantized model while TRL's ``__init__`` would
cast its trainable parameters, and data-driven selectors freeze it so a backward pass writes no weight
gradient. They all use ``FrozenFlags`` (or the ``frozen_parameters`` block built on it), so the bookkeeping
exists once. Flags are remembered per parameter object, not per name: modules added while the model is
frozen (neuron deltas) rename nothing that matters and are left alone on restore.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


class FrozenFlags:
    """The ``requires_grad`` flags of a model's parameters, taken when it is frozen and given back on ``restore``."""

    def __init__(self) -> None:
        self._flags: list[tuple[nn.Parameter, bool]] = []

    @property
    def active(self) -> bool:
        """True between ``freeze`` and ``restore``."""
        return bool(self._flags)

    def freeze(self, model: nn.Module) -> None:
        """Remember every parameter's flag, then set it to ``False``."""
        if self._flags:
            raise RuntimeError("This model is already frozen by the same owner (attach() or freeze() called twice): "
                               "detach() / restore() first.")
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        for param, _ in self._flags:
            param.requires_grad_(False)

    def restore(self) -> None:
        """Give every remembered parameter its flag back (parameters created since are left as they are)."""
        for param, flag in self._flags:
            param.requires_grad_(flag)
        self._flags = []


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` frozen for the block; the flags are restored on exit, even after an error."""
    flags = FrozenFlags()
    flags.freeze(model)
    try:
        yield
    finally:
        flags.restore()
