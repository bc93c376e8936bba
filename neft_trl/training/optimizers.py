"""Which optimizers ``hooks`` mode may use: those whose update leaves a zero-gradient element exactly in place.

In hooks mode the optimizer holds whole weight tensors; the frozen neurons' rows/columns get a gradient of
exactly zero (``hooks.py``) and no optimizer weight decay (neft_trl applies decay to the selected neurons
itself). They stay bit-identical only if the optimizer's update of an element whose gradient and state are
zero is exactly zero. That holds for optimizers whose update is a ratio or sign of unquantized moments of
the gradient (AdamW, Adafactor, SGD, Adagrad, RMSprop, Lion, AdEMAMix), and it fails, measurably, for
bitsandbytes' 8-bit Adam/AdEMAMix/Lion: their blockwise quantization stores a frozen element's zero
momentum as a small non-zero value, so it moves (8-bit RMSprop is fine: it quantizes only the squared
average, and its update is the gradient itself divided by it). Optimizers that project gradients (GaLore, APOLLO)
mix rows by design. Every other ``optim`` value is refused until verified: its package (torchao, torchdistx,
schedulefree, lomo-optim, grokadamw, optimi) or hardware (XLA, NPU) was not there to test.

``delta`` mode has no such limit: the optimizer only ever holds the selected neurons' deltas.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.training_args import OptimizerNames

from ..errors import UsageError

#: ``optim`` values verified to keep frozen neurons bit-identical in hooks mode (weight decay 0.1, tiny Llama;
#: tests/test_optimizers.py trains each one). bitsandbytes ones were run on its CPU backend.
VERIFIED_HOOKS_OPTIMIZERS: frozenset[str] = frozenset({
    "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
    "lion_32bit", "paged_lion_32bit", "paged_adamw_32bit", "ademamix", "paged_ademamix_32bit",
    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
})

_QUANTIZED_MOMENTUM = ("its 8-bit blockwise-quantized momentum stores a frozen element's zero as a small non-zero "
                       "value, so frozen neurons move")
_PROJECTED = "it projects gradients to a low rank, which mixes rows, so a frozen neuron's update is not zero"

#: Why a known ``optim`` value is refused in hooks mode; any value in neither table is refused as unverified.
REFUSED_HOOKS_OPTIMIZERS: dict[str, str] = {
    **dict.fromkeys(("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "ademamix_8bit", "paged_ademamix_8bit",
                     "lion_8bit", "paged_lion_8bit"), _QUANTIZED_MOMENTUM),
    **{o.value: _PROJECTED for o in OptimizerNames if o.value.startswith(("galore_", "apollo_"))},
}

#: Optimizer classes passed as ``optimizer_cls_and_kwargs`` that behave as their verified ``optim`` values.
VERIFIED_HOOKS_CLASSES: tuple[type, ...] = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad,
                                            torch.optim.RMSprop)


def check_hooks_optimizer(mode: str, optim: Any, optimizer_cls_and_kwargs: tuple[type, dict] | None = None) -> None:
    """Refuse, before training, an optimizer that could move frozen neurons in hooks mode; naming the fix."""
    if mode != "hooks":
        return
    fix = (f"Use neft_mode='delta' (the optimizer then holds only the selected neurons' deltas), or an optimizer "
           f"verified with hooks mode: optim in {sorted(VERIFIED_HOOKS_OPTIMIZERS)}.")
    if optimizer_cls_and_kwargs is not None:
        cls = optimizer_cls_and_kwargs[0]
        if cls not in VERIFIED_HOOKS_CLASSES:  # not subclasses: one may override step()
            raise UsageError(
                f"optimizer_cls_and_kwargs={getattr(cls, '__name__', cls)!r} is not verified with neft_mode='hooks': "
                "hooks mode keeps frozen neurons bit-identical only with optimizers whose update of a zero gradient "
                f"is exactly zero (torch's {', '.join(c.__name__ for c in VERIFIED_HOOKS_CLASSES)}). {fix}"
            )
        return
    name = OptimizerNames(optim).value
    if name in VERIFIED_HOOKS_OPTIMIZERS:
        return
    reason = REFUSED_HOOKS_OPTIMIZERS.get(name, "it is not verified to leave a zero-gradient element in place "
                                                "(its package or hardware was not there to test)")
    raise UsageError(f"optim={name!r} cannot train in neft_mode='hooks': {reason}. {fix}")
