"""Run a selector: instantiate the plugin, score, validate, rank within the budget, return a ``NeuronMask``.

This is the only place that calls selector plugins, so every plugin failure is reported the same way:
with the plugin's name and the package that provides it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from .budget import DEFAULT_NEURON_SCOPE, select_top, validate_scores
from .errors import ArgumentsError, UsageError
from .layers import parameter_count
from .mask import NeuronMask
from .plugins import get_selector
from .protection import protected_candidates
from .selectors.base import SelectionContext

logger = logging.getLogger("neft_trl")


def run_selector(
    context: SelectionContext,
    selector: str,
    selector_kwargs: Mapping[str, Any] | None = None,
    scope: str = DEFAULT_NEURON_SCOPE,
    protect_ratio: float = 0.0,
) -> NeuronMask:
    """Score every candidate neuron with the named selector and keep the budget's share of them, never one of the
    ``protect_ratio`` most active candidates of a group (``protection.py``).

    The selector runs from ``context.seed`` without changing any RNG the caller draws from, and the model's
    train/eval mode is restored afterwards. A selector that leaves hooks, ``requires_grad`` flags or
    gradients behind is an error naming it: the training run must start from the model it was given.
    """
    info = get_selector(selector)
    label = f"{info.name} (from {info.package})"
    kwargs = dict(selector_kwargs or {})
    try:
        instance = info.selector_class(**kwargs)
    except TypeError as err:
        raise ArgumentsError(f"Bad selector_kwargs {sorted(kwargs)} for selector {label}: {err}") from err
    except ValueError as err:
        raise UsageError(f"Bad selector_kwargs for selector {label}: {err}") from err
    keep = getattr(instance, "keep", "lowest")
    if keep not in ("lowest", "highest"):
        raise ValueError(f"Selector {label} declares keep={keep!r}; it must be 'lowest' or 'highest'.")
    model = context.model
    before = _model_state(model)
    start = time.perf_counter()
    with preserved_rng_state(), _restored_mode(model), context.one_selection():
        # reseeded before the protection and before the selector, so each depends on context.seed alone (a trainer's
        # dataloader shuffles from the global RNG), and the selector's draws not on whether protection ran
        _seed_everything(context.seed)
        protected = protected_candidates(context, protect_ratio)
        _seed_everything(context.seed)
        try:
            raw = instance.score(context)
        except Exception as err:
            # a bad input keeps its type (a UsageError names the fix); anything else is a plugin bug
            kind = type(err) if isinstance(err, UsageError) or type(err) in (ValueError, TypeError) else RuntimeError
            raise kind(f"Neuron selector {label} failed: {type(err).__name__}: {err}") from err
    seconds = time.perf_counter() - start
    _check_untouched(model, before, label)
    scores = validate_scores(context.neuron_map, raw, label)
    extra = {k: str(v) for k, v in (getattr(instance, "metadata", None) or {}).items()}
    total = context.total_parameters or parameter_count(model)
    meta = {**extra, "selector": info.name, "selector_package": info.package, "seed": str(context.seed),
            "model_parameters": str(total)}  # reports show the budget as the paper's share of the model
    if protected is not None:
        protected_count = sum(int(flags.sum()) for flags in protected.values())
        meta.update(protect_ratio=f"{protect_ratio:g}", protected_candidates=str(protected_count))
    mask = select_top(context.neuron_map, scores, context.budget, total, keep=keep, scope=scope, metadata=meta,
                      excluded=protected, excluded_by="protect_ratio")
    mask.metadata["selection_seconds"] = f"{seconds:.3f}"
    logger.info("NeFT: selector %s scored %d candidates in %.1fs", label, context.neuron_map.num_candidates, seconds)
    log_mask(mask)
    return mask


def _seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device) so a selector's random draws depend on ``seed`` alone."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _restored_mode(model: torch.nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _model_state(model: torch.nn.Module) -> dict[str, Any]:
    """What a selector must not change: hooks on any module, and each parameter's requires_grad and grad."""
    hooks = sum(getattr(hook, "__module__", None) != _TRANSFORMERS_CAPTURE
                for m in model.modules() for attr in _HOOK_DICTS for hook in getattr(m, attr, {}).values())
    params = {n: (p.requires_grad, p.grad is None) for n, p in model.named_parameters()}
    return {"hooks": hooks, "params": params}


def _check_untouched(model: torch.nn.Module, before: dict[str, Any], label: str) -> None:
    after = _model_state(model)
    if after["hooks"] != before["hooks"]:
        raise RuntimeError(f"Neuron selector {label} left {after['hooks'] - before['hooks']:+d} module hooks on the "
                           "model: a selector must remove every hook it registers (see neft_trl.selectors.tracing).")
    changed = [n for n, state in after["params"].items() if state != before["params"].get(n)]
    if changed:
        raise RuntimeError(f"Neuron selector {label} changed requires_grad or left .grad on {len(changed)} "
                           f"parameters (e.g. {changed[0]!r}): a selector must restore them.")


#: transformers 5 installs its output-capturing hooks (router logits, hidden states) once, on the first forward
#: that asks for them, and keeps them: MoE models ask during selection's first loss. They are not a selector's.
_TRANSFORMERS_CAPTURE = "transformers.utils.output_capturing"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


def log_mask(mask: NeuronMask) -> None:
    """Log the selection at INFO: totals, then per-layer counts."""
    logger.info(
        "NeFT: %d of %d neurons selected (%s), %s trainable parameters",
        mask.num_selected, mask.num_total, mask.metadata.get("budget", "loaded mask"),
        f"{mask.trainable_parameters:,}",
    )
    logger.info("NeFT: neurons per layer: %s", mask.per_layer_counts())


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run a block without changing any RNG the training run draws from (python, numpy, torch CPU/accelerator).

    Selection draws random numbers (probe dropout, data order); the real run must start exactly as if
    selection had not happened.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
