"""The cosine selector's probe: a short fine-tune of the candidate projections that never writes a weight.

Every candidate projection gets a full-size fp32 delta ``D`` (in the layer's own ``[out, in]`` orientation)
added by a forward hook, ``y = layer(x) + x D^T``; only the deltas train. ``D`` is a ``NeuronDelta`` over all
of the projection's neurons, attached the way delta mode attaches its deltas (``training/delta_layer.py``).
The base weights are never written, so the original model stays bit-identical by construction, and 4-bit/8-bit
layers (whose weights cannot train) are probed the same way. The deltas train with the trainer's own optimizer
class and settings, learning-rate schedule (stretched over the probe), gradient accumulation, clipping,
autocast and batches, which is the paper's "fully fine-tune for K steps" restricted to the weights that are
scored.

Not carried over on purpose: weight decay (on a delta it would pull ``W + D`` towards ``W``, not towards 0;
the paper trains with decay 0) and gradients of non-candidate weights (they are not scored, so the probe
saves their memory).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Trainer, get_scheduler

from ..compat import model_checkpoints_activations
from ..layers import features, is_quantized, parameter_count
from ..training.delta_layer import NeuronDelta, attached_deltas
from .base import SelectionContext
from .tracing import frozen, model_mode

logger = logging.getLogger("neft_trl")

#: Learning rate when the probe runs outside a trainer (the paper's fine-tuning rate).
PAPER_LEARNING_RATE = 2e-5
#: Default probe length: a twentieth of the run's optimizer steps, at least MIN and at most MAX. A probe step
#: costs about one training step, so long runs spend about 5% of their time selecting. The floor is there for
#: short runs: after one Adam step every neuron has moved by the same normalised amount, so a 1-step probe's
#: cosine ranks neurons by their own norm rather than by what the task needs (issue 12 measured it on a 20-step
#: run: eval loss 3.098 and prose loss +1.33 with a 1-step probe, 2.935 and +0.54 with a 10-step one).
MIN_DEFAULT_PROBE_STEPS = 10
MAX_DEFAULT_PROBE_STEPS = 50
PROBE_SHARE_OF_RUN = 0.05


@dataclass
class ProbeResult:
    """The trained deltas (module name -> fp32 ``[out, in]``) and what the probe cost."""

    deltas: dict[str, torch.Tensor]
    steps: int
    learning_rate: float
    state_bytes: int  # deltas + their gradients + optimizer state
    full_finetune_state_bytes: int  # gradients + the same optimizer state for every parameter of the model


def default_probe_steps(context: SelectionContext) -> int:
    """In a trainer, ``run_steps // 20`` clamped to 10..50: about 5% of a long run, never a collapsed 1-step probe.

    Outside a trainer (``select_neurons``), one pass over the batches given as a list (at most 50); 50 where
    neither is known (a generator of batches).
    """
    if context.trainer is not None:
        total = _run_steps(context.trainer)
    elif isinstance(context.batches, Sequence):
        return max(1, min(MAX_DEFAULT_PROBE_STEPS, len(context.batches)))
    else:
        total = None
    if total is None:
        return MAX_DEFAULT_PROBE_STEPS
    return max(MIN_DEFAULT_PROBE_STEPS, min(MAX_DEFAULT_PROBE_STEPS, int(total * PROBE_SHARE_OF_RUN)))


def run_probe(context: SelectionContext, steps: int, learning_rate: float | None) -> ProbeResult:
    """Fine-tune deltas of every candidate projection for ``steps`` optimizer steps; the model is left untouched."""
    model = context.model
    elements = sum(math.prod(features(proj.module)) for proj in context.neuron_map)
    logger.info(
        "NeFT cosine probe (full): full-size fp32 deltas of %s weights, about %.2f GiB with their gradients and "
        "AdamW moments (16 bytes a weight); selector_kwargs={'probe': 'sketch'} bounds this by the neurons",
        f"{elements:,}", 16 * elements / 2**30,
    )
    # a full-size delta is a NeuronDelta over every neuron: the layer and forward hook delta mode trains with
    deltas = {proj.name: NeuronDelta(torch.arange(proj.num_neurons), proj.is_input, *features(proj.module),
                                     device=proj.module.weight.device) for proj in context.neuron_map}
    weights = {name: delta.weight for name, delta in deltas.items()}
    optimizer, scheduler, accumulation, max_grad_norm = optimizer_and_schedule(context, list(weights.values()), steps,
                                                                   learning_rate)
    lr = optimizer.param_groups[0]["lr"] if scheduler is None else scheduler.base_lrs[0]
    # Reentrant gradient checkpointing only back-propagates into checkpointed blocks whose inputs need grad.
    input_grads = model_checkpoints_activations(model)
    state_bytes = 0
    modules = {proj.module: deltas[proj.name] for proj in context.neuron_map}
    with model_mode(model, training=True), frozen(model, input_grads=input_grads), attached_deltas(modules):
        batches = context.iter_batches(steps * accumulation, "cosine", "NeFT cosine probe")
        for index, batch in enumerate(batches, start=1):
            loss = context.loss(model, batch) / accumulation
            loss.backward()
            if index % accumulation:
                continue
            if max_grad_norm and max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(weights.values()), max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            state_bytes = max(state_bytes, _state_bytes(optimizer, weights))
            optimizer.zero_grad(set_to_none=True)
    full_bytes = _full_finetune_bytes(model, optimizer, weights)
    del optimizer, scheduler
    trained = {name: w.detach() for name, w in weights.items()}
    logger.info(
        "NeFT cosine probe: %d steps at lr %.3g; probe state %.1f MiB vs %.1f MiB of gradients + optimizer state "
        "for a full fine-tune (%.0f%%)", steps, lr, state_bytes / 2**20, full_bytes / 2**20,
        100 * state_bytes / max(full_bytes, 1),
    )
    return ProbeResult(trained, steps, lr, state_bytes, full_bytes)


def optimizer_and_schedule(
    context: SelectionContext, params: list[torch.Tensor], steps: int, learning_rate: float | None
):
    """The trainer's optimizer class and kwargs, schedule, accumulation and clipping, applied to ``params``.

    Both probes use it: the full probe steps this optimizer on its deltas, the sketch probe reads its
    learning rate, betas and eps (its optimizer holds one dummy element) and steps the schedule.
    """
    trainer = context.trainer
    if trainer is None:
        optimizer = torch.optim.AdamW(params, lr=learning_rate or PAPER_LEARNING_RATE, weight_decay=0.0)
        return optimizer, None, 1, 1.0
    args = trainer.args
    optimizer_cls, kwargs = (getattr(trainer, "optimizer_cls_and_kwargs", None)
                             or Trainer.get_optimizer_cls_and_kwargs(args, context.model))
    kwargs = dict(kwargs)
    if learning_rate is not None:
        kwargs["lr"] = learning_rate
    try:
        optimizer = optimizer_cls([{"params": params, "weight_decay": 0.0}], **kwargs)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                                  num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
    except Exception as err:
        raise ValueError(
            f"The cosine probe cannot reuse the trainer's optimizer/scheduler ({args.optim}, "
            f"{args.lr_scheduler_type}): {type(err).__name__}: {err}. Pass selector_kwargs={{'reference_model': ...}} "
            "(an already fine-tuned model) or use a standard torch optimizer (e.g. optim='adamw_torch')."
        ) from err
    return optimizer, scheduler, args.gradient_accumulation_steps, args.max_grad_norm


def _state_bytes(optimizer: torch.optim.Optimizer, deltas: dict[str, torch.Tensor]) -> int:
    tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += list(deltas.values()) + [d.grad for d in deltas.values() if d.grad is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def _full_finetune_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, deltas: dict[str, torch.Tensor]) -> int:
    """Gradients (in each parameter's dtype) plus the probe's optimizer state per element, for every parameter."""
    delta_elements = sum(d.numel() for d in deltas.values())
    state = _state_bytes(optimizer, {})
    state_per_element = state / max(delta_elements, 1)
    quantized = {id(m.weight): math.prod(features(m)) for m in model.modules() if is_quantized(m)}
    grad_bytes = sum(2 * quantized[id(p)] if id(p) in quantized else p.numel() * p.element_size()  # bf16 grads
                     for p in model.parameters())
    return int(grad_bytes + state_per_element * parameter_count(model))


def _run_steps(trainer: Trainer) -> int | None:
    """Optimizer steps of the coming run, or None where the data has no length (an iterable dataset)."""
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    try:
        batches = len(trainer.get_train_dataloader())
    except TypeError:
        return None
    return max(1, batches // max(args.gradient_accumulation_steps, 1)) * max(1, math.ceil(args.num_train_epochs))
