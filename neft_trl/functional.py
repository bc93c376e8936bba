"""NeFT without a Trainer: ``select_neurons`` then ``apply_neurons``, the analogue of PEFT's ``get_peft_model``.

The two calls are the whole method: a selector scores every candidate neuron and the budget keeps the best
(``select_neurons`` -> ``NeuronMask``), then a training mode makes exactly those neurons trainable
(``apply_neurons`` -> a ``NeuronTraining`` handle). ``NeFTSFTTrainer`` is built on the same two calls, so a
custom PyTorch / accelerate loop, an FSDP2 job and the trainer all train the same way::

    mask = select_neurons(model, batches, "cosine", param_ratio=0.06)
    handle = apply_neurons(model, mask, mode="delta")        # before wrapping the model (DDP, fully_shard)
    optimizer = handle.make_optimizer(torch.optim.AdamW, lr=1e-4, weight_decay=0.0)
    ...                                                      # your loop: loss.backward(); optimizer.step()
    handle.save("out")                                       # neft_delta.safetensors + neuron_mask.safetensors
    model = handle.merge()                                   # or: plain weights with the deltas folded in
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .attention import ROLES as ATTENTION_ROLES
from .budget import DEFAULT_NEURON_SCOPE, Budget
from .distributed import check_same_mask
from .layers import parameter_count
from .mask import NeuronMask
from .neurons import DEFAULT_NEURON_UNIT, NeuronMap, build_neuron_map
from .protection import DEFAULT_PROTECT_RATIO
from .selection import run_selector
from .selectors.base import Batch, SelectionContext
from .training import NeuronTraining, build_training, resolve_mode


def select_neurons(
    model: nn.Module,
    batches: Iterable[Batch] | Callable[[int], Iterable[Batch]] | None,
    selector: str = "cosine",
    *,
    param_ratio: float | None = None,
    neuron_ratio: float | None = None,
    num_neurons: int | None = None,
    seed: int = 0,
    neuron_unit: str = DEFAULT_NEURON_UNIT,
    neuron_scope: str = DEFAULT_NEURON_SCOPE,
    include_gate: bool = False,
    neuron_modules: Mapping[str, str] | None = None,
    neuron_targets: str | tuple[str, ...] = "mlp",
    attention_modules: Mapping[str, str] | None = None,
    protect_ratio: float | None = None,
    compute_loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
    show_progress: bool = True,
    **selector_kwargs: Any,
) -> NeuronMask:
    """Score every candidate neuron of ``model`` with ``selector`` and keep the budget's best.

    Args:
        model: the model to fine-tune (full precision or bitsandbytes 4/8-bit), on its training device.
        batches: model-input dicts with ``labels`` on the model's device (a list is cycled as needed), or a
            callable ``batches(n)`` yielding ``n`` of them; ``None`` for data-free selectors (``random``).
        selector: an installed selector plugin (``neft_trl.available_selectors()``).
        param_ratio / neuron_ratio / num_neurons: the budget, as in ``NeFTConfig`` (default: 6% of all
            parameters, the paper's); set at most one.
        seed: seeds the selector's random draws; no RNG of the caller changes.
        neuron_unit, neuron_scope, include_gate, neuron_modules, neuron_targets, attention_modules: as in
            ``NeFTConfig``.
        protect_ratio: as in ``NeFTConfig``; ``None``: its default where ``batches`` are given, 0 for a data-free
            selection (``batches=None``), which has no activations to measure.
        compute_loss: ``compute_loss(model, batch) -> loss``; default: the model's own ``outputs.loss``.
        **selector_kwargs: the selector's own options (e.g. ``probe_steps=20`` for cosine).
    """
    budget = Budget.resolve(param_ratio, neuron_ratio, num_neurons)
    neuron_map = build_neuron_map(model, neuron_unit, include_gate, neuron_modules, neuron_targets, attention_modules)
    context = SelectionContext(
        model=model, neuron_map=neuron_map, budget=budget, seed=seed,
        batches=batches if batches is None or callable(batches) else list(batches),
        compute_loss=compute_loss, show_progress=show_progress, total_parameters=parameter_count(model),
    )
    if protect_ratio is None:
        protect_ratio = DEFAULT_PROTECT_RATIO if batches is not None else 0.0
    return run_selector(context, selector, selector_kwargs, neuron_scope, protect_ratio)


def apply_neurons(
    model: nn.Module, mask: NeuronMask, mode: str = "delta", *, neuron_map: NeuronMap | None = None
) -> NeuronTraining:
    """Make exactly the neurons of ``mask`` trainable in ``model``; every other parameter is frozen.

    ``mode``: ``"delta"`` (small per-neuron deltas beside frozen weights: any precision, FSDP2-ready when
    applied before wrapping), ``"hooks"`` (the full-precision weights train, gradient hooks zero the rest), or
    ``"auto"``. Returns the attached handle: ``handle.make_optimizer(...)`` builds an optimizer over the
    trainable neurons that never moves a frozen one, ``handle.save(dir)`` writes the result,
    ``handle.merge()`` folds deltas into full-precision weights, ``handle.detach()`` undoes everything.

    A mask made for another model (or another layout) is refused with the shapes that differ. In a
    multi-process job every rank must call this with the same mask (checked; see
    ``neft_trl.distributed.broadcast_mask``), and under FSDP2 before ``fully_shard`` (a sharded model is refused).
    """
    neuron_map = neuron_map or neuron_map_for_mask(model, mask)
    check_same_mask(mask)
    training = build_training(resolve_mode(mode, neuron_map), model, neuron_map, mask)
    training.attach()
    return training


def neuron_map_for_mask(model: nn.Module, mask: NeuronMask) -> NeuronMap:
    """The neuron map of ``model`` in the layout ``mask`` was made in (unit, gate rows, MLP and attention child
    names, targets)."""
    children: dict[str, str] = {}
    for name, info in mask.info.items():
        children.setdefault(str(info["role"]), name.rsplit(".", 1)[-1])
    mlp = {role: child for role, child in children.items() if role in ("up", "gate", "down")}
    attention = {role: child for role, child in children.items() if role in ATTENTION_ROLES}
    targets = tuple(t for t, found in (("mlp", mlp), ("attention", attention)) if found)
    neuron_map = build_neuron_map(
        model, mask.metadata.get("neuron_unit", "vector"), include_gate="gate" in mlp, neuron_modules=mlp or None,
        targets=targets or None, attention_modules=attention or None,
    )
    mask.check_fits(neuron_map)
    return neuron_map
