"""Training modes: how a ``NeuronMask`` becomes trainable parameters (``hooks`` or ``delta``)."""

from __future__ import annotations

from torch import nn

from ..layers import is_quantized
from ..mask import NeuronMask
from ..neurons import NeuronMap
from .base import NeuronTraining
from .hooks import GradientMaskTraining

__all__ = ["GradientMaskTraining", "NeuronTraining", "build_training", "resolve_mode"]


def resolve_mode(mode: str, neuron_map: NeuronMap) -> str:
    """``auto`` -> ``delta`` for quantized models, ``hooks`` otherwise; ``hooks`` on a quantized model is an error.

    Why ``hooks`` in full precision: both modes train the same weights (weight decay 0) and measured the same
    step time on CPU (tiny Llama, a 4-layer 256/1024 Llama, SmolLM2-135M: differences within run-to-run noise),
    and ``hooks`` saves a plain checkpoint that ``from_pretrained`` loads, with the paper's weight decay. Pick
    ``delta`` explicitly to hold gradients and optimizer state for the selected neurons only (less memory).
    """
    quantized = [p.name for p in neuron_map if is_quantized(p.module)]
    if mode == "auto":
        return "delta" if quantized else "hooks"
    if mode == "hooks" and quantized:
        raise ValueError(
            f"neft_mode='hooks' cannot train quantized weights ({quantized[0]} is 4/8-bit): use neft_mode='delta' "
            "or 'auto'."
        )
    return mode


def build_training(mode: str, model: nn.Module, neuron_map: NeuronMap, mask: NeuronMask) -> NeuronTraining:
    """The training mode object for ``mode`` (already resolved), not yet attached."""
    if mode == "hooks":
        return GradientMaskTraining(model, neuron_map, mask)
    if mode == "delta":
        from .delta import DeltaTraining

        return DeltaTraining(model, neuron_map, mask)
    raise ValueError(f"Unknown neft_mode {mode!r}: use 'auto', 'hooks' or 'delta'.")
