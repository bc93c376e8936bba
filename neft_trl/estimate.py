"""Memory estimate of a NeFT run before anything runs (``neft-trl estimate``; the trainer logs it at start).

In the spirit of ``accelerate estimate-memory``: built from shapes only (a model on the meta device is
enough), it adds up what each phase holds besides the activations, for NeFT and for PEFT LoRA on all linear
layers at the same number of trainable parameters:

- weights: the model's own parameters in their dtype (4/8-bit weights at their packed size);
- selection: the selector's persistent state (the cosine probes: see ``selectors/sketch_probe.py`` and
  ``selectors/probe.py``) plus its largest transient (one projection's fp32 dense copy);
- training: trainable values + their gradients + AdamW's two moments. Delta mode and LoRA hold them in fp32
  for their own small tensors; hooks mode holds a gradient and two moments (in the weights' dtype) for
  every up/down matrix that has a selected neuron (at a 6% budget: all of them).

Activations depend on batch, sequence length and checkpointing, not on the method: they are left out and
stated separately (``activation_bytes`` gives a rough figure for one batch without checkpointing).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .budget import Budget, select_top
from .layers import features, is_supported_layer, parameter_count
from .neurons import NeuronMap
from .selectors.sketch_probe import DEFAULT_SKETCH_DIM

logger = logging.getLogger("neft_trl")

ADAM_BYTES_PER_FP32_VALUE = 16  # value + gradient + 2 moments, 4 bytes each
GiB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes per component and phase for one method (``neft`` or ``lora``); activations excluded."""

    method: str
    weights: int
    trainable_parameters: int
    selection: dict[str, int] = field(default_factory=dict)
    training: dict[str, int] = field(default_factory=dict)

    @property
    def selection_peak(self) -> int:
        return self.weights + sum(self.selection.values())

    @property
    def training_peak(self) -> int:
        return self.weights + sum(self.training.values())

    @property
    def peak(self) -> int:
        return max(self.selection_peak, self.training_peak)


def lora_parameters_per_rank(model: nn.Module) -> int:
    """Trainable parameters a rank-1 LoRA adds on all linear layers: ``sum(in + out)``, output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = sum(sum(features(m)) for m in model.modules() if m is not head and is_supported_layer(m))
    if total == 0:
        raise ValueError(f"{type(model).__name__} has no linear layers besides its output head: LoRA has no target.")
    return total


def lora_rank_for(model: nn.Module, trainable_parameters: int) -> int:
    """The LoRA rank whose all-linear adapter is closest in size to ``trainable_parameters`` (at least 1)."""
    return max(1, round(trainable_parameters / lora_parameters_per_rank(model)))


def neft_trainable_parameters(neuron_map: NeuronMap, budget: Budget, total_parameters: int) -> int:
    """Parameters NeFT trains under ``budget``, whatever the selector: the core's ranking of constant scores."""
    flat = {g.key: torch.zeros(g.size) for g in neuron_map.groups}
    return select_top(neuron_map, flat, budget, total_parameters).trainable_parameters


def weight_bytes(model: nn.Module) -> int:
    """The model's parameters as stored (quantized weights at their packed size) plus its buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_neft(
    model: nn.Module, neuron_map: NeuronMap, budget: Budget, selector: str = "cosine", mode: str = "delta",
    probe: str = "sketch", sketch_dim: int = DEFAULT_SKETCH_DIM,
) -> MemoryEstimate:
    """What NeFT holds in selection and in training (``mode`` already resolved: ``hooks`` or ``delta``)."""
    trainable = neft_trainable_parameters(neuron_map, budget, parameter_count(model))
    candidates = [math.prod(features(p.module)) for p in neuron_map]
    estimate = MemoryEstimate("neft", weight_bytes(model), trainable)
    neurons = sum(p.num_neurons for p in neuron_map)
    if selector == "cosine" and probe == "full":
        estimate.selection["probe deltas, gradients, AdamW moments"] = ADAM_BYTES_PER_FP32_VALUE * sum(candidates)
    elif selector == "cosine":
        widths = {p.vector_size: min(sketch_dim, p.vector_size) for p in neuron_map}
        estimate.selection["probe sketches (3 per neuron) and scalars"] = sum(
            p.num_neurons * (3 * 4 * widths[p.vector_size] + 5 * 8) for p in neuron_map)
        estimate.selection["random projections"] = sum(4 * w * size for size, w in widths.items())
    elif selector in ("activation", "gradient"):
        estimate.selection["per-neuron sums"] = 8 * neurons
    estimate.selection["largest transient (one projection, fp32)"] = 4 * max(candidates)
    if mode == "hooks":
        dtype_bytes = max(p.module.weight.element_size() for p in neuron_map)
        estimate.training["full-size gradients of the neuron matrices"] = dtype_bytes * sum(candidates)
        estimate.training["AdamW moments of the neuron matrices"] = 2 * dtype_bytes * sum(candidates)
    else:
        estimate.training["deltas, gradients, AdamW moments (fp32)"] = ADAM_BYTES_PER_FP32_VALUE * trainable
    return estimate


def estimate_lora(model: nn.Module, trainable_parameters: int) -> MemoryEstimate:
    """PEFT LoRA on all linear layers at the rank closest to ``trainable_parameters``."""
    rank = lora_rank_for(model, trainable_parameters)
    params = rank * lora_parameters_per_rank(model)
    estimate = MemoryEstimate(f"lora r{rank}", weight_bytes(model), params)
    estimate.training["adapters, gradients, AdamW moments (fp32)"] = ADAM_BYTES_PER_FP32_VALUE * params
    return estimate


def activation_bytes(model: nn.Module, tokens: int, dtype_bytes: int = 4) -> int:
    """A rough figure for one batch's saved activations without checkpointing (Llama-like decoder):
    about ``16 * hidden + 4 * intermediate`` values per token and layer, plus the logits (twice)."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", 0)
    inter = getattr(config, "intermediate_size", 4 * hidden)
    layers = getattr(config, "num_hidden_layers", 0)
    vocab = getattr(config, "vocab_size", 0)
    return tokens * dtype_bytes * (layers * (16 * hidden + 4 * inter) + 2 * vocab)


def format_table(neft: MemoryEstimate, lora: MemoryEstimate, activations: int | None = None) -> str:
    """A markdown table of both estimates by component and phase, with the ratio of peaks to LoRA's."""
    rows = [("weights", neft.weights, lora.weights)]
    rows += [(f"selection: {k}", v, 0) for k, v in neft.selection.items()]
    rows += [(f"training: {k}", v, None) for k, v in neft.training.items()]
    rows += [(f"training: {k}", None, v) for k, v in lora.training.items()]
    rows += [("peak in selection", neft.selection_peak, None), ("peak in training", neft.training_peak,
                                                               lora.training_peak)]
    lines = [f"| component | NeFT ({neft.trainable_parameters:,} params) | {lora.method} "
             f"({lora.trainable_parameters:,} params) |", "|---|---|---|"]
    cell = lambda b: "" if b is None else f"{b / GiB:.3f} GiB"  # noqa: E731
    lines += [f"| {name} | {cell(a)} | {cell(b)} |" for name, a, b in rows]
    lines.append(f"| **peak / LoRA's** | **{neft.peak / lora.peak:.2f}x** | 1.00x |")
    if activations is not None:
        lines.append(f"\nActivations (not included above; rough, one batch, no checkpointing): "
                     f"{activations / GiB:.3f} GiB for both methods.")
    return "\n".join(lines)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` now (CUDA: the driver's count; CPU: MemAvailable), or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def advice_if_too_big(estimate: MemoryEstimate, free: int, total_parameters: int, mode: str, probe: str) -> str | None:
    """None where the estimate's extra bytes (weights are already loaded) fit ``free``; else what would fit."""
    extra = estimate.peak - estimate.weights
    if extra <= free:
        return None
    fixes = []
    if estimate.selection and probe == "full":
        fixes.append("selector_kwargs={'probe': 'sketch'} (bounded probe)")
    if mode == "hooks":
        fixes.append("neft_mode='delta' (state for the selected neurons only)")
    ratio = free / ADAM_BYTES_PER_FP32_VALUE / max(total_parameters, 1)
    fixes.append(f"param_ratio <= {ratio:.4f} in delta mode")
    return (f"NeFT's estimated memory beyond the loaded weights ({extra / GiB:.2f} GiB, activations excluded) exceeds "
            f"the {free / GiB:.2f} GiB free on this device. Settings that fit: {'; '.join(fixes)}.")


def log_estimate(model: nn.Module, neuron_map: NeuronMap, budget: Budget, selector: str, mode: str,
                 selector_kwargs: dict | None = None) -> MemoryEstimate:
    """Log the estimate at INFO (the trainer calls this at start) and warn, naming settings that fit, where
    it exceeds the free memory of the model's device."""
    probe = (selector_kwargs or {}).get("probe", "sketch")
    neft = estimate_neft(model, neuron_map, budget, selector, mode, probe)
    logger.info("NeFT memory estimate (activations excluded):\n%s", format_table(neft, estimate_lora(
        model, neft.trainable_parameters)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    free = free_memory(device)
    advice = None if free is None else advice_if_too_big(neft, free, parameter_count(model), mode, probe)
    if advice:
        logger.warning(advice)
    return neft
