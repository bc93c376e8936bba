"""Export a NeFT run as a standard PEFT LoRA adapter, so any engine that serves LoRA adapters serves NeFT.

A neuron delta is exactly a LoRA update ``B @ A`` with scaling 1:

* in-neurons (``k`` rows of up/gate): ``A`` = the delta rows ``[k, in]``, ``B`` = one-hot columns ``[out, k]``
  (``B[index[j], j] = 1``); an in-neuron's bias delta goes into ``lora_B.bias`` (PEFT's ``lora_bias``);
* out-neurons (``k`` columns of down): ``A`` = one-hot rows ``[k, in]`` (``A[j, index[j]] = 1``), ``B`` = the
  delta columns ``[out, k]``.

So each module gets its own rank ``k`` (``rank_pattern``) and ``lora_alpha = k`` (``alpha_pattern``); the
global ``r`` and ``lora_alpha`` are both the largest rank, so an engine that ignores the patterns and scales by
the global ``lora_alpha / r`` (vLLM, TGI) still scales by exactly 1. ``uniform_rank=True`` pads every module to
that largest rank with zero rows/columns (the product is unchanged) and writes no patterns, for engines that
need one rank per layer type or scale by ``lora_alpha / (each tensor's rank)`` (llama.cpp).

The config is PEFT's own ``LoraConfig`` saved by PEFT, the tensors use PEFT's key names
(``base_model.model.<module>.lora_A.weight``), and both files are written atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_write
from ..layers import is_transposed
from ..loading import load_model, model_skeleton
from ..mask import MASK_FILENAME, NeuronMask
from .delta_diff import deltas_from_models
from .delta_io import DELTA_FILENAME, check_delta_fits, read_neuron_delta
from .delta_layer import NeuronDelta

ADAPTER_CONFIG_FILENAME = "adapter_config.json"
ADAPTER_FILENAME = "adapter_model.safetensors"
_CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json")


def export_peft_adapter(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str | os.PathLike | nn.Module | None = None,
    *,
    uniform_rank: bool = False,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``output_dir``; returns that folder.

    Args:
        run_dir: the output folder of a NeFT run: a ``delta`` run (``neft_delta.safetensors``) or a ``hooks``
            run (a full checkpoint + ``neuron_mask.safetensors``).
        output_dir: where the adapter goes; not ``run_dir`` (an ``adapter_config.json`` beside a checkpoint
            makes ``from_pretrained`` load the folder as an adapter).
        base_model: the model the run started from (a folder or a loaded model). Required for a hooks run (the
            delta is ``trained - base``); optional for a delta run, where it is checked against the deltas and
            decides the layer layout (``fan_in_fan_out`` for GPT-2's ``Conv1D``).
        uniform_rank: pad every module to the largest rank instead of writing per-module ranks.
    """
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"No NeFT run folder at {str(run_dir)!r}: pass the output_dir of a NeFT run.")
    if output_dir.resolve() == run_dir.resolve():
        raise ValueError("Write the adapter to its own folder, not into the run folder: an adapter_config.json "
                         "beside a checkpoint makes from_pretrained load that folder as an adapter.")
    if (run_dir / DELTA_FILENAME).is_file():
        deltas, meta = read_neuron_delta(run_dir)
        model = _skeleton(base_model) if base_model is not None else None
        if model is not None:
            check_delta_fits(model, deltas)
        name_or_path = meta.get("base_model_name_or_path")
    elif any((run_dir / f).is_file() for f in _CHECKPOINT_FILES) and (run_dir / "config.json").is_file():
        if base_model is None:
            raise ValueError(f"{str(run_dir)!r} is a hooks-mode run (a full checkpoint): pass base_model (the model "
                             "or folder it was trained from), so that the adapter holds trained - base.")
        mask_path = run_dir / MASK_FILENAME
        if not mask_path.is_file():
            raise FileNotFoundError(f"{str(run_dir)!r} holds a checkpoint but no {MASK_FILENAME}: export needs the "
                                    "mask NeFTSFTTrainer.save_model writes beside the model.")
        model = _load(run_dir)
        deltas, meta = deltas_from_models(model, _load(base_model), NeuronMask.load(mask_path)), {}
        name_or_path = None
    else:
        raise ValueError(f"{str(run_dir)!r} is not a NeFT run folder: expected {DELTA_FILENAME} (delta mode) or "
                         f"config.json + {_CHECKPOINT_FILES[0]} + {MASK_FILENAME} (hooks mode).")
    if not deltas:
        raise ValueError(f"{str(run_dir)!r} trains no neurons (empty mask): there is no adapter to export.")
    if isinstance(base_model, (str, os.PathLike)):
        name_or_path = str(base_model)
    elif base_model is not None:
        name_or_path = getattr(getattr(base_model, "config", None), "_name_or_path", None) or name_or_path
    fan_in_fan_out = _fan_in_fan_out(deltas, model, meta)
    write_peft_adapter(deltas, output_dir, fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=name_or_path,
                       uniform_rank=uniform_rank)
    return output_dir


def lora_factors(delta: NeuronDelta, rank: int, lora_bias: bool) -> dict[str, torch.Tensor]:
    """PEFT's ``lora_A.weight`` ``[rank, in]``, ``lora_B.weight`` ``[out, rank]`` (and ``lora_B.bias``) of one delta.

    ``B @ A`` equals ``delta.dense()`` exactly: one factor holds the delta's values, the other ones and
    zeros. Ranks above the delta's neuron count are zero padding.
    """
    k = delta.index.numel()
    if rank < k:
        raise ValueError(f"LoRA rank {rank} is below the delta's {k} neurons.")
    dtype = delta.weight.dtype
    a = torch.zeros(rank, delta.in_features, dtype=dtype)
    b = torch.zeros(delta.out_features, rank, dtype=dtype)
    index, slots = delta.index.cpu(), torch.arange(k)
    if delta.is_input:
        a[:k] = delta.weight.detach().cpu()
        b[index, slots] = 1
    else:
        a[slots, index] = 1
        b[:, :k] = delta.weight.detach().cpu()
    factors = {"lora_A.weight": a, "lora_B.weight": b}
    if lora_bias:
        bias = torch.zeros(delta.out_features, dtype=dtype)
        if delta.bias is not None:
            bias[index] = delta.bias.detach().cpu().to(dtype)
        factors["lora_B.bias"] = bias
    return factors


def write_peft_adapter(
    deltas: Mapping[str, NeuronDelta],
    output_dir: str | os.PathLike,
    *,
    fan_in_fan_out: bool,
    base_model_name_or_path: str | None = None,
    uniform_rank: bool = False,
) -> None:
    """Write neuron deltas as a PEFT LoRA adapter folder (see the module docstring for the exact form)."""
    try:
        from peft import LoraConfig
        from peft.utils.other import get_pattern_key
    except ImportError as err:
        raise ImportError(f"Exporting a PEFT adapter needs peft ({err}): pip install 'neft-trl[peft]'.") from err
    output_dir = Path(output_dir)
    ranks = {name: int(d.index.numel()) for name, d in sorted(deltas.items())}
    top = max(ranks.values())
    lora_bias = any(d.bias is not None for d in deltas.values())
    patterns = {} if uniform_rank else ranks
    config = LoraConfig(
        task_type="CAUSAL_LM", r=top, lora_alpha=top, rank_pattern=dict(patterns), alpha_pattern=dict(patterns),
        target_modules=list(ranks), lora_dropout=0.0, bias="none", lora_bias=lora_bias,
        fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base_model_name_or_path, inference_mode=True,
    )
    for name in patterns:  # PEFT reads pattern keys as regexes: each must pick exactly its own module
        if get_pattern_key(list(patterns), name) != name:
            raise ValueError(f"Module name {name!r} matches another module's rank_pattern key: use uniform_rank=True.")
    tensors: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items():
        for key, value in lora_factors(delta, top if uniform_rank else ranks[name], lora_bias).items():
            tensors[f"base_model.model.{name}.{key}"] = value.contiguous()
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / ADAPTER_FILENAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    with tempfile.TemporaryDirectory(dir=output_dir) as staging:  # PEFT's own writer, then an atomic rename
        config.save_pretrained(staging)
        os.replace(Path(staging) / ADAPTER_CONFIG_FILENAME, output_dir / ADAPTER_CONFIG_FILENAME)


def _fan_in_fan_out(deltas: Mapping[str, NeuronDelta], model: nn.Module | None, meta: Mapping[str, str]) -> bool:
    """True where the targeted layers store weights ``[in, out]`` (GPT-2 ``Conv1D``): PEFT's ``fan_in_fan_out``."""
    if model is not None:
        modules = dict(model.named_modules())
        layouts = {is_transposed(modules[name]) for name in deltas}
    elif "fan_in_fan_out" in meta:
        layouts = {meta["fan_in_fan_out"] == "True"} if meta["fan_in_fan_out"] in ("True", "False") else {True, False}
    else:
        raise ValueError("This neuron delta file does not record its layers' weight layout (saved before neft-trl "
                         "recorded fan_in_fan_out): pass base_model (a folder or the model) to export it.")
    if len(layouts) != 1:
        raise ValueError("The targeted layers mix Conv1D ([in, out]) and Linear ([out, in]) weights, which one PEFT "
                         "LoRA config (a single fan_in_fan_out) cannot describe.")
    return layouts.pop()


def _load(source: str | os.PathLike | nn.Module) -> nn.Module:
    """A model object as given, or loaded from a folder in its saved dtype."""
    if isinstance(source, nn.Module):
        return source
    return load_model(source, dtype="auto")


def _skeleton(source: str | os.PathLike | nn.Module) -> nn.Module:
    """The base model's module tree for checking shapes and layer classes: no weights are read from a folder."""
    if isinstance(source, nn.Module):
        return source
    return model_skeleton(source)

