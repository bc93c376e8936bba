"""The two benchmark regimes, and what each measures before and after training.

* **short** (``--max_steps``): the test loss every ``--eval_steps`` (the curve); the final model is reported,
  its dev loss chooses the learning rate.
* **long** (``--epochs``, about 3): that many passes over the training pairs; test and dev loss every half
  epoch; the model of the best dev evaluation is reported (``checkpoint.py``): its test loss (logged at that
  same evaluation), its chrF and its forgetting. The best dev loss chooses the learning rate.

Both measure **forgetting**: the loss on general English prose (``forgetting.py``) before training and after
(for the long regime: of the restored best checkpoint); ``forgetting`` is after minus before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import BestDevCheckpoint
from .forgetting import prose_dataset


def schedule(max_steps: int, eval_steps: int, epochs: float, train_pairs: int, batch_size: int) -> tuple[int, int]:
    """``(max_steps, eval_steps)``: as given (short regime), or ``epochs`` passes with an eval every half epoch."""
    if not epochs:
        return max_steps, eval_steps
    if epochs < 0:
        raise ValueError(f"--epochs must be positive (or 0 for the short regime), got {epochs}.")
    per_epoch = math.ceil(train_pairs / batch_size)
    return max(1, math.ceil(epochs * per_epoch)), max(1, per_epoch // 2)


@dataclass
class Regime:
    """One run's regime: its eval datasets and callbacks, and the numbers it records before and after training."""

    long: bool
    prose_size: int
    checkpoint: BestDevCheckpoint | None = field(default=None, init=False)
    prose: Any = field(default=None, init=False)
    facts: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.checkpoint = BestDevCheckpoint() if self.long else None
        self.prose, self.facts = prose_dataset(self.prose_size) if self.prose_size else (None, {})

    @property
    def name(self) -> str:
        return "long" if self.long else "short"

    @property
    def callbacks(self) -> list[Any]:
        return [self.checkpoint] if self.checkpoint is not None else []

    @property
    def curve_key(self) -> str:
        return "eval_test_loss" if self.long else "eval_loss"

    def eval_dataset(self, data: tuple) -> Any:
        """What the Trainer evaluates every ``eval_steps``: the test pairs, and in the long regime the dev pairs too."""
        _, dev, test = data
        return {"test": test, "dev": dev} if self.long else test

    def prose_loss(self, trainer: Any) -> float | None:
        if self.prose is None:
            return None
        return float(trainer.evaluate(self.prose, metric_key_prefix="prose")["prose_loss"])

    def before(self, trainer: Any, data: tuple) -> dict[str, Any]:
        """The untrained model's test loss and prose loss."""
        loss = trainer.evaluate(data[2], metric_key_prefix="test")["test_loss"]
        return {"eval_loss_before": float(loss), "prose_loss_before": self.prose_loss(trainer)}

    def after(self, trainer: Any, data: tuple, before: float, prose_before: float | None) -> dict[str, Any]:
        """Test loss, dev loss and forgetting of the reported model (the final one, or the best dev checkpoint)."""
        step = trainer.state.global_step
        if not any(self.curve_key in e and e.get("step") == step for e in trainer.state.log_history):
            trainer.evaluate()  # the curve's last point is the trained model's loss
        curve = self._curve(trainer, self.curve_key, before)
        record: dict[str, Any] = {"eval_curve": curve}
        if self.checkpoint is None:
            record["eval_loss_after"] = curve[-1][1]
            record["dev_loss_after"] = trainer.evaluate(data[1], metric_key_prefix="dev")["dev_loss"]
        else:
            self.checkpoint.restore(trainer.model)
            record["dev_curve"] = self._curve(trainer, "eval_dev_loss", None)
            record["best_step"] = self.checkpoint.best_step
            record["eval_loss_after"] = dict(curve)[self.checkpoint.best_step]
            record["dev_loss_after"] = self.checkpoint.best_loss
        prose_after = self.prose_loss(trainer)
        if prose_after is not None and prose_before is not None:
            record.update(prose_loss_after=prose_after, forgetting=prose_after - prose_before)
        return record

    @staticmethod
    def _curve(trainer: Any, key: str, before: float | None) -> list[tuple[int, float]]:
        """``[(step, loss)]`` from the Trainer's log history (from step 0 where ``before`` is given)."""
        points = [(0, before)] if before is not None else []
        points += [(int(e["step"]), float(e[key])) for e in trainer.state.log_history if key in e]
        return sorted(dict(points).items())
