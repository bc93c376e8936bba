"""The long regime's model selection: keep the trainable weights of the best dev evaluation, restore them at the end.

Over several epochs a method may start to overfit, so each one reports the test loss and chrF of its best
*dev* checkpoint (never chosen on the test set). Saving checkpoints to disk would differ per method (full
weights, LoRA adapters, NeFT deltas) and cost minutes on a slow disk; instead this callback copies, in memory,
exactly the parameters that train (``requires_grad``: NeFT deltas or hooked projections, LoRA adapters, every
weight for full fine-tuning) whenever the dev loss improves, and ``restore`` writes the best copy back. All
other parameters are frozen, so the restored model is the model as it was at that evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

DEV_METRIC = "eval_dev_loss"  # Trainer's key for the "dev" entry of a dict eval_dataset


class BestDevCheckpoint(TrainerCallback):
    """Track the lowest ``eval_dev_loss`` and a copy of the trainable parameters at that step."""

    def __init__(self) -> None:
        self.best_loss = float("inf")
        self.best_step: int | None = None
        self._weights: dict[str, torch.Tensor] = {}

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        loss = (metrics or {}).get(DEV_METRIC)
        if loss is None or model is None or state.global_step == 0 or loss >= self.best_loss:
            return
        self.best_loss, self.best_step = float(loss), int(state.global_step)
        self._weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> None:
        """Write the best evaluation's trainable parameters back into ``model``."""
        if self.best_step is None:
            raise RuntimeError(f"No dev evaluation ({DEV_METRIC}) happened during training: the long regime needs "
                               "eval_steps > 0 and a 'dev' eval dataset.")
        params = dict(model.named_parameters())
        missing = sorted(self._weights.keys() - params.keys())
        if missing:
            raise RuntimeError(f"The model lost parameters since the best checkpoint was taken: {missing[:3]}.")
        for name, value in self._weights.items():
            params[name].copy_(value)
