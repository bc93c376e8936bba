"""The selector interface: a selector scores every candidate neuron; the core ranks and builds the mask.

Selectors never touch training and never see the budget's arithmetic: they return one float per
candidate of every ``NeuronGroup`` (``dict[group.key, Tensor[group.size]]``) and declare with ``keep``
whether the lowest (the paper's cosine similarity) or the highest scores win.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..budget import Budget
from ..neurons import NeuronMap

Batch = dict[str, torch.Tensor]


@dataclass
class SelectionContext:
    """Everything a selector may use. Data-driven selectors draw batches; they never tokenize on their own.

    Attributes:
        model: the model being fine-tuned (unwrapped, on its training device).
        neuron_map: the candidate projections and their ranked groups.
        budget: the neuron budget (informational; the core applies it).
        seed: ``args.seed``; selectors that draw random numbers must use a generator seeded from it.
        batches: ``batches(n)`` yields up to ``n`` collated training batches already on the model's device,
            taken from the trainer's own train dataloader (same tokenization, collator and order).
        compute_loss: ``compute_loss(model, batch) -> scalar loss`` as the trainer computes it.
        trainer: the trainer, for selectors that need its arguments (optimizer settings for a probe).
        show_progress: whether to draw tqdm bars.
    """

    model: nn.Module
    neuron_map: NeuronMap
    budget: Budget
    seed: int = 0
    batches: Callable[[int], Iterator[Batch]] | None = None
    compute_loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None
    trainer: Any = None
    show_progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def require_batches(self, selector: str) -> Callable[[int], Iterator[Batch]]:
        if self.batches is None:
            raise ValueError(
                f"Selector {selector!r} needs training data: give the trainer a train_dataset, or pass "
                "calibration batches to select_neurons(batches=...)."
            )
        return self.batches

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


class NeuronSelector(ABC):
    """Base class for selectors (subclassing is optional: the plugin system only needs the attributes).

    Subclasses set ``name`` and ``keep`` and implement ``score``. Constructor keyword arguments are the
    user's ``selector_kwargs``; an unknown keyword is a TypeError naming the selector.
    """

    name: ClassVar[str] = ""
    keep: ClassVar[str] = "lowest"

    @abstractmethod
    def score(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        """One float score per candidate: ``{group.key: Tensor[group.size]}`` for every group of the map."""
