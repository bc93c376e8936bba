"""``gradient``: keep the neurons whose weights the training loss is most sensitive to (first-order Taylor).

Scores come from activation hooks, never from ``weight.grad``: the model's weights may be frozen or
4/8-bit, and materialising every weight gradient would cost a full fine-tune's memory. For one layer
``y = x W^T (+ b)`` the weight gradient is ``g^T x`` (``g = dL/dy``), so for one batch

- an in-neuron ``i`` (row ``i`` and its bias): ``w_i . grad_i = sum_t g[t, i] * y[t, i]``;
- an out-neuron ``j`` (column ``j`` of down): ``w_j . grad_j = sum_t x[t, j] * (dL/dx)[t, j]``;
- ``importance="norm"``: ``||grad_i||^2`` from the transient ``g^T x`` of one projection at a time.

The Taylor importance of a neuron (the loss change if its weights were zeroed) is ``|w . grad|`` summed
over the whole neuron (for ``neuron_unit="mlp"``: over all projections of the unit); the norm importance is
``||grad||``. Per-batch values are averaged over ``calibration_batches`` batches.

A routed expert (mixture-of-experts models) is observed through its expert views (``neft_trl.experts``):
``x``, ``y`` and the gradients are those of the tokens routed to it. An expert that received no token in a
batch adds 0 for that batch (it had no effect on the loss), never an error.
"""

from __future__ import annotations

import torch

from ..experts import is_expert_view
from ..neurons import Projection
from ..plugins import hookimpl
from .activation import check_batches
from .base import NeuronSelector, SelectionContext
from .tracing import frozen, model_mode, removing

IMPORTANCES = ("taylor", "norm")


class GradientSelector(NeuronSelector):
    """Accumulated first-order Taylor importance ``|w . g|`` (or gradient norm) per neuron; highest kept.

    Args:
        calibration_batches: training batches to average over (default 8; one forward+backward each, with
            no weight gradients kept).
        importance: ``"taylor"`` (default, ``|w . g|``) or ``"norm"`` (``||g||``).
    """

    name = "gradient"
    keep = "highest"

    def __init__(self, calibration_batches: int = 8, importance: str = "taylor"):
        super().__init__()
        self.calibration_batches = check_batches(self.name, calibration_batches)
        if importance not in IMPORTANCES:
            raise ValueError(f"Selector 'gradient': importance={importance!r} is not one of {IMPORTANCES}.")
        self.importance = importance

    def score(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        model, neuron_map = context.model, context.neuron_map
        batch_values: dict[str, torch.Tensor] = {}  # projection -> this batch's per-neuron value
        totals = {g.key: torch.zeros(g.size, dtype=torch.float64) for g in neuron_map.groups}

        def add(proj: Projection, value: torch.Tensor) -> None:
            value = value.detach().float()
            batch_values[proj.name] = batch_values[proj.name] + value if proj.name in batch_values else value

        def on_forward(proj: Projection, inputs: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:  # e.g. the no-grad first pass of reentrant gradient checkpointing
                return
            x, y = inputs[0].detach(), output.detach()  # references, not copies: autograd keeps them anyway
            if self.importance == "norm":
                output.register_hook(lambda g: add(proj, _grad_norm_sq(proj, _tokens(g), _tokens(x))))
            elif proj.is_input:
                output.register_hook(lambda g: add(proj, (_tokens(g) * _tokens(y)).sum(0)))
            else:
                inputs[0].register_hook(lambda gx: add(proj, (_tokens(gx) * _tokens(x)).sum(0)))

        count = 0
        with model_mode(model, training=False), frozen(model, input_grads=True), removing([]) as handles:
            for proj in neuron_map:
                handles.append(proj.module.register_forward_hook(
                    lambda m, args, out, proj=proj: on_forward(proj, args, out)))
            for batch in context.iter_batches(self.calibration_batches, self.name, "NeFT gradient calibration"):
                loss = context.loss(model, batch)
                if not loss.requires_grad:
                    raise RuntimeError("The loss does not depend on the MLP activations (no gradient flows).")
                loss.backward()
                missing = [p.name for p in neuron_map if p.name not in batch_values and not is_expert_view(p.module)]
                if missing:
                    raise RuntimeError(f"No gradient reached {missing[:3]}: the loss does not flow through these "
                                       "MLP projections (are they used in the forward pass?).")
                for group in neuron_map.groups:
                    total = sum(batch_values[p.name].double().cpu() if p.name in batch_values
                                else torch.zeros(p.num_neurons, dtype=torch.float64) for p in group.projections)
                    total = total.abs() if self.importance == "taylor" else total.sqrt()
                    totals[group.key] += total.double().cpu()
                batch_values.clear()
                count += 1
        self.metadata.update(calibration_batches=str(count), importance=self.importance)
        return {key: (total / count).float() for key, total in totals.items()}


def _tokens(tensor: torch.Tensor) -> torch.Tensor:
    """``[tokens, features]`` fp32, detached (padding rows carry zero gradient, so they add nothing)."""
    return tensor.detach().reshape(-1, tensor.shape[-1]).float()


def _grad_norm_sq(proj: Projection, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared norm of each neuron's weight gradient, from this projection's transient ``g^T x`` ([out, in])."""
    grad_weight = g.t() @ x
    if not proj.is_input:
        return grad_weight.square().sum(0)
    norms = grad_weight.square().sum(1)
    return norms + g.sum(0).square() if proj.trains_bias else norms


@hookimpl
def neft_register_selectors(register):
    register(GradientSelector)
