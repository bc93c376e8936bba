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

from .budget import select_top, validate_scores
from .layers import parameter_count
from .mask import NeuronMask
from .plugins import get_selector
from .selectors.base import SelectionContext

logger = logging.getLogger("neft_trl")


def select_neurons(
    context: SelectionContext,
    selector: str,
    selector_kwargs: Mapping[str, Any] | None = None,
    scope: str = "global",
) -> NeuronMask:
    """Score every candidate neuron with the named selector and keep the budget's share of them."""
    info = get_selector(selector)
    label = f"{info.name} (from {info.package})"
    try:
        instance = info.selector_class(**dict(selector_kwargs or {}))
    except TypeError as err:
        raise TypeError(f"Bad selector_kwargs for selector {label}: {err}") from err
    keep = getattr(instance, "keep", "lowest")
    start = time.perf_counter()
    try:
        raw = instance.score(context)
    except Exception as err:
        raise RuntimeError(f"Neuron selector {label} failed: {type(err).__name__}: {err}") from err
    scores = validate_scores(context.neuron_map, raw, label)
    mask = select_top(
        context.neuron_map,
        scores,
        context.budget,
        parameter_count(context.model),
        keep=keep,
        scope=scope,
        metadata={"selector": info.name, "selector_package": info.package, "seed": str(context.seed)},
    )
    mask.metadata["selection_seconds"] = f"{time.perf_counter() - start:.3f}"
    log_mask(mask)
    return mask


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
