"""``activation``: keep the neurons that fire hardest on the training data (mean |activation|, no gradients).

An in-neuron (row ``n`` of up/gate) is scored by its own projection's output feature ``n``; an out-neuron
(column ``n`` of down) by down's input feature ``n``, i.e. the intermediate activation after the MLP
nonlinearity (and gating) that the column multiplies. For ``neuron_unit="mlp"`` the unit is scored by
that post-nonlinearity activation too. Padding tokens (``attention_mask == 0``) are not counted.

A routed expert (mixture-of-experts models) is observed through its expert views (``neft_trl.experts``), so
its neurons are averaged over the tokens routed to that expert only. An expert that received no token
during calibration scores 0 (it never fired on this data), never an error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..experts import is_expert_view
from ..neurons import Projection
from ..plugins import hookimpl
from .base import Batch, NeuronSelector, SelectionContext
from .tracing import flat_tokens, model_mode, removing


def check_batches(selector: str, value: Any) -> int:
    """``calibration_batches`` must be a positive integer (shared by the data-driven selectors)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Selector {selector!r}: calibration_batches must be a positive integer, got {value!r}.")
    return value


def forward_inputs(model: nn.Module, batch: Batch) -> Batch:
    """The batch as a plain forward pass takes it: no labels (no loss needed) and no KV cache."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if hasattr(getattr(model, "config", None), "use_cache"):
        inputs["use_cache"] = False
    return inputs


class ActivationSelector(NeuronSelector):
    """Mean absolute activation per intermediate neuron over ``calibration_batches`` batches; highest kept.

    Args:
        calibration_batches: training batches to average over (default 16; forward passes only).
    """

    name = "activation"
    keep = "highest"

    def __init__(self, calibration_batches: int = 16):
        super().__init__()
        self.calibration_batches = check_batches(self.name, calibration_batches)

    def score(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        self.metadata["calibration_batches"] = str(self.calibration_batches)
        return mean_activations(context, self.calibration_batches, self.name)


def mean_activations(context: SelectionContext, calibration_batches: int, user: str) -> dict[str, torch.Tensor]:
    """Mean |activation| of every candidate of every group over ``calibration_batches`` training batches, fp32 on
    CPU, keyed by ``NeuronGroup.key``: the activation selector's score, and what ``protect_ratio`` protects.

    ``user`` names who asked (a selector, or the protection), for the messages about missing batches. Both draw the
    same batches (``run_selector`` seeds before each), so within one selection a second call with the same count
    reuses the first's measurement (copied: a caller may change its scores in place).
    """
    means = context.memoized(("mean_activations", calibration_batches),
                             lambda: _measure_activations(context, calibration_batches, user))
    return {key: value.clone() for key, value in means.items()}


def _measure_activations(context: SelectionContext, calibration_batches: int, user: str) -> dict[str, torch.Tensor]:
    model = context.model
    measured = [_measured(g.projections) for g in context.neuron_map.groups]
    sums = {p.name: torch.zeros(p.num_neurons, dtype=torch.float64, device=p.module.weight.device) for p in measured}
    tokens = dict.fromkeys(sums, 0)
    current: dict[str, torch.Tensor | None] = {"attention_mask": None}

    def accumulate(proj: Projection, activation: torch.Tensor) -> None:
        routed = getattr(proj.module, "token_index", None)  # an expert view: its routed tokens' positions
        flat = flat_tokens(activation.detach(), current["attention_mask"], routed)
        sums[proj.name] += flat.abs().sum(0, dtype=torch.float64).to(sums[proj.name].device)
        tokens[proj.name] += flat.shape[0]

    with torch.no_grad(), model_mode(model, training=False), removing([]) as handles:
        for proj in measured:
            if proj.is_input:
                handles.append(proj.module.register_forward_hook(lambda m, args, out, proj=proj: accumulate(proj, out)))
            else:
                handles.append(proj.module.register_forward_pre_hook(
                    lambda m, args, proj=proj: accumulate(proj, args[0])))
        for batch in context.iter_batches(calibration_batches, user, f"NeFT activations ({user})"):
            current["attention_mask"] = batch.get("attention_mask")
            model(**forward_inputs(model, batch))
    unrouted = {p.name for p in measured if is_expert_view(p.module)}  # an expert may get no tokens: score 0
    if not all(n for name, n in tokens.items() if name not in unrouted):
        missing = [name for name, n in tokens.items() if n == 0 and name not in unrouted][:3]
        raise RuntimeError(f"No activations reached {missing}: the calibration batches hold no real tokens, "
                           "or the model's forward pass does not run these MLPs.")
    means = {name: (s / max(tokens[name], 1)).float().cpu() for name, s in sums.items()}
    return {g.key: means[_measured(g.projections).name] for g in context.neuron_map.groups}


def _measured(projections: tuple[Projection, ...]) -> Projection:
    """A vector group is measured on its own projection; an ``mlp`` unit on its down projection's input (on its
    first projection where a tied attention unit has no output projection, e.g. k with v)."""
    if len(projections) == 1:
        return projections[0]
    return next((p for p in projections if not p.is_input), projections[0])


@hookimpl
def neft_register_selectors(register):
    register(ActivationSelector)
