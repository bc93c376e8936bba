"""``protect_ratio``: never select the channels the model relies on most, whichever selector ranks the rest.

A few channels of every layer carry far larger activations than the others on any text (the "massive
activations" of Sun et al. 2024). They serve general text as much as the task, so training them at a rate
that rewrites a neuron moves the model's behaviour everywhere. The cosine selector likes them: on SmolLM2-135M
it put 135 of its 2,101 channels into the 1% most active of their layers on unrelated English prose (random:
17). Protecting each layer's 3% most active channels brought the forgetting probe to within 0.01 of LoRA's in
short and multi-epoch runs (README "Results"). The measure is the activation selector's own (mean |activation| on
training batches, forward passes only), taken per ranked group, so each layer protects its own share."""

from __future__ import annotations

import math

import torch

from .errors import UsageError
from .selectors.activation import mean_activations
from .selectors.base import SelectionContext

#: The default: 3% of each layer's candidates, the share that did best over both regimes (README "Results", 2 seeds
#: each). In the 3-epoch run it beat full fine-tuning's test loss at LoRA's forgetting (1.785 / +0.003; 1%: 1.847 /
#: +0.088, 5%: 1.810 / -0.000); in 60-step runs it forgets within 0.01 of LoRA, at +0.02 test loss against 1%.
DEFAULT_PROTECT_RATIO = 0.03
#: Training batches whose activations decide what is protected (forward passes only, as the activation selector).
PROTECT_BATCHES = 16


def check_protect_ratio(value: float) -> float:
    """``protect_ratio`` must be a share in ``[0, 1)``: 1 would leave nothing to select."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UsageError(f"protect_ratio must be a share in [0, 1) (0 protects nothing), got {value!r}.")
    return float(value)


def protected_candidates(context: SelectionContext, ratio: float) -> dict[str, torch.Tensor] | None:
    """Per ranked group (``NeuronGroup.key``), a bool tensor marking its ``ratio`` most active candidates (rounded
    up), or ``None`` when ``ratio`` is 0. Needs training batches: a data-free selection cannot measure activity."""
    ratio = check_protect_ratio(ratio)
    if ratio == 0:
        return None
    if context.batches is None:
        raise UsageError(f"protect_ratio={ratio:g} measures which channels are most active on training batches, "
                         "and this selection has none: give the trainer a train_dataset (or select_neurons "
                         "batches), or set protect_ratio=0.")
    activity = mean_activations(context, PROTECT_BATCHES, "protect_ratio")
    protected = {}
    for group in context.neuron_map.groups:
        flags = torch.zeros(group.size, dtype=torch.bool)
        count = min(group.size, math.ceil(ratio * group.size - 1e-9))
        order = torch.sort(activity[group.key], descending=True, stable=True).indices  # ties: lower index first
        flags[order[:count]] = True
        protected[group.key] = flags
    return protected
