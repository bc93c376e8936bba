"""Loading a model from a folder or hub id: the one function every part of neft_trl uses to read a model.

The trainer (a model passed as a string), the cosine selector's ``reference_model``, the PEFT export, the
CLI's ``estimate`` and the demo helpers all load through ``load_model`` (weights) or ``model_skeleton``
(shapes only), so that dtype, device placement and quantization are always explicit arguments and every path
resolves the model class the way TRL does (``trl.trainer.utils.create_model_from_path``: the architecture
named in ``config.json``, remote code where allowed).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


class _TrlDefault:
    """The ``device_map`` that leaves placement to TRL: the whole model on CPU on a CPU/MPS machine, else "auto"."""

    def __repr__(self) -> str:
        return "TRL_DEFAULT"


#: ``load_model(..., device_map=TRL_DEFAULT)``: place the model as ``SFTTrainer`` would when given a path.
TRL_DEFAULT = _TrlDefault()


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device_map: str | dict[str, Any] | _TrlDefault | None = None,
    quantization_config: Any = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """The model saved at ``name_or_path`` (a folder written by ``save_pretrained``, or a hub id).

    Args:
        dtype: of the loaded weights; ``"auto"`` keeps the dtype they were saved in. Default fp32, TRL's.
        device_map: ``None`` loads the whole model on CPU; ``"auto"``, a device or a module->device dict is
            passed to ``from_pretrained``; ``TRL_DEFAULT`` places it as ``SFTTrainer`` would.
        quantization_config: a ``BitsAndBytesConfig`` (or other transformers quantization config) to load
            4/8-bit weights; ``None`` loads them as saved.
        from_pretrained_kwargs: anything else ``from_pretrained`` takes (``revision``, ``trust_remote_code``,
            ``attn_implementation``, ...).
    """
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(from_pretrained_kwargs, dtype=dtype)
    if not isinstance(device_map, _TrlDefault):
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return create_model_from_path(os.fspath(name_or_path), **kwargs)


def model_skeleton(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's module tree on the ``meta`` device, from its ``config.json`` alone: no weight is read or allocated.

    For what needs shapes and layer classes only (checking saved deltas against a base, memory estimates).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(os.fspath(name_or_path))
    kwargs = {} if dtype is None else {"dtype": dtype}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)
