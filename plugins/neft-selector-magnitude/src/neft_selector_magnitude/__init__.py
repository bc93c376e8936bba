"""neft-selector-magnitude: a third-party neft-trl selector that keeps the neurons with the largest weights.

Score = the p-norm of each candidate neuron's weight vector (a row of up/gate, a column of down; for
``neuron_unit="mlp"`` the whole unit), from the weights as the forward pass uses them (dequantized for
4/8-bit layers). A data-free baseline: no batches, no gradients, milliseconds. It imports only
``neft_trl.plugin_api``, the surface neft_trl keeps stable for plugin authors.
"""

from __future__ import annotations

import torch

from neft_trl.plugin_api import SelectionContext, dense_weight, hookimpl, neuron_vectors


class MagnitudeSelector:
    """Largest ``||w||_p`` per neuron wins (``keep = "highest"``). Set ``selector_kwargs={"p": 1}`` for L1."""

    name = "magnitude"
    keep = "highest"

    def __init__(self, p: float = 2.0):
        if not p > 0:
            raise ValueError(f"p must be > 0 (the norm's order), got {p!r}.")
        self.p = float(p)

    def score(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        scores = {}
        for group in context.neuron_map.groups:
            powers = sum(neuron_vectors(proj, dense_weight(proj.module)).abs().pow(self.p).sum(1)
                         for proj in group.projections)
            scores[group.key] = powers.pow(1 / self.p).cpu()
        return scores


@hookimpl
def neft_register_selectors(register):
    register(MagnitudeSelector)
