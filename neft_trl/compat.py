"""The few places where transformers / TRL versions differ, or where NeFT must step around them, in one module.

Keep every version check and every deliberate bypass of a library rule here, each with the reason, so that
upgrading a dependency means reading one file.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .errors import UsageError
from .freezing import frozen_parameters
from .layers import is_quantized_model
from .loading import TRL_DEFAULT, load_model

_PEFT_FLAG = "_hf_peft_config_loaded"


@contextmanager
def quantized_training_allowed(model: nn.Module) -> Iterator[None]:
    """Let ``Trainer.__init__`` accept a bitsandbytes model that has no PEFT adapter, for this block only.

    transformers refuses to train a quantized model without an adapter: in 5.x
    ``trainer_utils.validate_quantization_for_training``, in 4.57 the same test inline in ``Trainer.__init__``.
    Both read ``model.is_quantized and not model._hf_peft_config_loaded`` (4.57 then also asks
    ``hf_quantizer.is_qat_trainable``). NeFT's delta mode *is* the adapter, but it is created after
    ``__init__`` (when the neurons are selected), so the flag that says "an adapter is loaded" is raised only
    while ``__init__`` runs and restored (or removed) right after, even on error: ``save_pretrained`` and
    ``gradient_checkpointing_enable`` read the same flag and must see the model's true state later.
    """
    if not is_quantized_model(model):
        yield
        return
    had_flag = _PEFT_FLAG in vars(model)
    previous = vars(model).get(_PEFT_FLAG)
    setattr(model, _PEFT_FLAG, True)
    try:
        yield
    finally:
        if had_flag:
            setattr(model, _PEFT_FLAG, previous)
        else:
            delattr(model, _PEFT_FLAG)


@contextmanager
def frozen_during_trl_init(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter of a quantized model while ``SFTTrainer.__init__`` runs, then restore the flags.

    TRL (>= 1.x) casts every ``requires_grad`` parameter of a 4/8-bit model to bf16 in ``__init__`` (meant
    for QLoRA adapters). On a model without an adapter that hits the norms and embeddings, so the "frozen"
    model would change. NeFT's trainable deltas are created later, in the dtype NeFT chooses.
    """
    if not is_quantized_model(model):
        yield
        return
    with frozen_parameters(model):
        yield


def load_model_like_trl(
    model_id: str, args: Any, quantization_config: Any = None, processing_class: Any = None
) -> tuple[nn.Module, Any]:
    """Load ``model_id`` the way ``SFTTrainer.__init__`` would; return ``(model, processing_class)``.

    NeFT loads the model itself instead of passing the path on, so that a quantized model can be frozen
    (``frozen_during_trl_init``) before TRL's bf16 cast runs. Same rules as TRL: ``args.model_init_kwargs``
    plus ``quantization_config`` (set in only one place), ``device_map=None`` under DDP/DeepSpeed, fp32 unless
    ``dtype`` is set (``loading.load_model``, built on TRL's ``create_model_from_path``); without a
    ``processing_class`` the processor is loaded from the same path and revision as the model.
    """
    from transformers import AutoProcessor

    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise UsageError(
                "quantization_config is set both as a trainer argument and in args.model_init_kwargs: set it in "
                "only one place, preferably as the trainer argument."
            )
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # "auto" fails under distributed training
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    model = load_model(model_id, dtype=kwargs.pop("dtype", "float32"), device_map=kwargs.pop("device_map", TRL_DEFAULT),
                       quantization_config=kwargs.pop("quantization_config", None), **kwargs)
    if processing_class is None:
        processing_class = AutoProcessor.from_pretrained(
            model_id, revision=kwargs.get("revision"), trust_remote_code=args.trust_remote_code
        )
    return model, processing_class


def activation_checkpointing_on(args: Any) -> bool:
    """Whether the training arguments turn activation (a.k.a. gradient) checkpointing on.

    Newer transformers 5.x renamed ``TrainingArguments.gradient_checkpointing`` to ``activation_checkpointing``
    and keeps the old name only as a deprecated mirror until v6; 4.57 and 5.0 know only the old name. Reading
    the new name first keeps NeFT working on both sides of the rename, and after the old name is gone.
    """
    value = getattr(args, "activation_checkpointing", None)
    if value is None:
        value = getattr(args, "gradient_checkpointing", False)
    return bool(value)


def model_checkpoints_activations(model: nn.Module) -> bool:
    """Whether activation checkpointing is on for ``model`` (a ``PreTrainedModel``; other modules: ``False``).

    Same rename on the model: ``is_activation_checkpointing`` in newer 5.x, where ``is_gradient_checkpointing``
    still works but warns on every read; only ``is_gradient_checkpointing`` in 4.57 and 5.0.
    """
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def dequantize(model: nn.Module, dtype: Any = None) -> nn.Module:
    """``model.dequantize()`` into ``dtype`` (default: transformers' choice), dropping the quantization config.

    5.x takes ``dequantize(dtype=...)``; 4.57's ``dequantize()`` takes no argument and dequantizes into
    ``model.dtype`` (the dtype of the non-quantized weights), so there the result is cast afterwards (a
    bitsandbytes model refuses ``.to(dtype)`` before it is dequantized).
    """
    if "dtype" in inspect.signature(model.dequantize).parameters:
        return model.dequantize(dtype=dtype)
    model = model.dequantize()
    return model if dtype is None else model.to(dtype)
