"""``random``: a seeded uniform choice of neurons, the baseline the paper lacks."""

from __future__ import annotations

import torch

from ..plugins import hookimpl
from .base import NeuronSelector, SelectionContext


class RandomSelector(NeuronSelector):
    """Scores every candidate with an independent uniform draw from a generator seeded by ``args.seed``."""

    name = "random"
    keep = "highest"

    def score(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        generator = context.generator()
        return {g.key: torch.rand(g.size, generator=generator) for g in context.neuron_map.groups}


@hookimpl
def neft_register_selectors(register):
    register(RandomSelector)
