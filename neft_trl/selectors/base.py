"""The selector interface: a selector scores every candidate neuron; the core ranks and builds the mask.

Selectors never touch training and never see the budget's arithmetic: they return one float per
candidate of every ``NeuronGroup`` (``dict[group.key, Tensor[group.size]]``) and declare with ``keep``
whether the lowest (the paper's cosine similarity) or the highest scores win.
"""

from __future__ import annotations

import contextlib
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..budget import Budget
from ..errors import UsageError
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
            taken from the trainer's own train dataloader (same tokenization, collator and order). Outside a
            trainer, a list of ready batches also works (it is cycled).
        compute_loss: ``compute_loss(model, batch) -> scalar loss`` as the trainer computes it; without it,
            ``loss`` falls back to the model's own ``outputs.loss`` (the batches then need ``labels``).
        trainer: the trainer, for selectors that need its arguments (optimizer settings for a probe).
        show_progress: whether to draw tqdm bars.
        total_parameters: all parameters of the model before any training mode added its own (the base of
            ``param_ratio``); counted from ``model`` when not given.
    """

    model: nn.Module
    neuron_map: NeuronMap
    budget: Budget
    seed: int = 0
    batches: Callable[[int], Iterator[Batch]] | Sequence[Batch] | None = None
    compute_loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None
    trainer: Any = None
    show_progress: bool = True
    total_parameters: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _memo: dict[Any, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def require_batches(self, selector: str) -> Callable[[int], Iterator[Batch]]:
        if self.batches is None:
            raise UsageError(
                f"Selector {selector!r} needs training data: give the trainer a train_dataset, or build the "
                "SelectionContext with batches=[batch, ...] (collated dicts of tensors on the model's device)."
            )
        if callable(self.batches):
            return self.batches
        ready = list(self.batches)
        return lambda count: itertools.islice(itertools.cycle(ready), count if ready else 0)

    def iter_batches(self, count: int, selector: str, desc: str) -> Iterator[Batch]:
        """``count`` batches under a tqdm bar; an empty data source is an error, not a silent zero score."""
        if int(count) != count or count < 1:
            raise UsageError(f"Selector {selector!r}: the number of batches must be a positive integer, got {count!r}.")
        produced = 0
        bar = tqdm(total=int(count), desc=desc, unit="batch", disable=not self.show_progress, leave=False)
        with bar:
            for batch in self.require_batches(selector)(int(count)):
                produced += 1
                yield batch
                bar.update()
        if produced == 0:
            raise UsageError(f"Selector {selector!r} got no batches: the training data (or calibration set) is empty.")

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of one batch, computed as the trainer computes it (including its autocast)."""
        batch = dict(batch)  # the trainer's compute_loss may add or pop keys
        if self.compute_loss is not None:
            manager = getattr(self.trainer, "compute_loss_context_manager", None)
            with manager() if manager is not None else contextlib.nullcontext():
                return self.compute_loss(model, batch)
        outputs = model(**batch)
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError(
                "The model returned no loss: calibration batches need `labels` (or set SelectionContext.compute_loss)."
            )
        return loss

    @contextlib.contextmanager
    def one_selection(self) -> Iterator[None]:
        """The span of one selection (``run_selector``), over which ``memoized`` results stay valid: the model and
        the seeded batches do not change inside it. Outside it nothing is kept, so a reused context never sees a
        stale result."""
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def memoized(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``'s result, computed once per selection: ``protect_ratio`` and the activation selector both
        measure mean activations on the same seeded batches of an unchanged model, so the second reuses the first.
        This assumes ``batches(n)`` repeats itself from the same seed (a trainer's dataloader or a list does)."""
        if self._memo is None:
            return compute()
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


class NeuronSelector(ABC):
    """Base class for selectors (subclassing is optional: the plugin system only needs the attributes).

    Subclasses set ``name`` and ``keep`` and implement ``score``. Constructor keyword arguments are the
    user's ``selector_kwargs``; an unknown keyword is a TypeError naming the selector. A selector may fill
    ``self.metadata`` (string facts such as probe steps or memory) during ``score``; they are saved in the mask.
    """

    name: ClassVar[str] = ""
    keep: ClassVar[str] = "lowest"

    def __init__(self) -> None:
        self.metadata: dict[str, str] = {}

    @abstractmethod
    def score(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        """One float score per candidate: ``{group.key: Tensor[group.size]}`` for every group of the map."""
