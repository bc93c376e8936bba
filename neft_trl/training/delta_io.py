"""Neuron delta files: save, apply to a base model for inference, or merge into a full-precision model.

A delta-mode run is saved as ``neft_delta.safetensors`` (per projection: ``<module>.index`` int64 ``[k]``,
``<module>.weight`` and, for in-neurons with a bias, ``<module>.bias``; the layer shapes in the safetensors
metadata) plus ``neft_delta_config.json`` (base model, revision, mode, budget, selector), next to the
``neuron_mask.safetensors``. Every file is written to a temporary name and renamed, so a process killed in
the middle of a save leaves the previous file or none, never a truncated one that loads wrong.

The file is keyed by module name and carries each layer's ``[out, in]`` shape, so applying it to another
model fails with an error that names the shapes instead of silently adding garbage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_write
from ..compat import dequantize
from ..experts import install_expert_views
from ..layers import features, is_quantized
from .delta_layer import NeuronDelta, attach_delta, has_delta

DELTA_FILENAME = "neft_delta.safetensors"
DELTA_CONFIG_FILENAME = "neft_delta_config.json"
_FORMAT = "neft_trl.delta/1"


def save_neuron_delta(
    deltas: Mapping[str, NeuronDelta], output_dir: str | os.PathLike, config: Mapping[str, Any]
) -> Path:
    """Write ``neft_delta.safetensors`` and ``neft_delta_config.json`` into ``output_dir``; returns the delta path."""
    output_dir = Path(output_dir)
    tensors: dict[str, torch.Tensor] = {}
    layout = {}
    for name, delta in deltas.items():
        tensors[f"{name}.index"] = delta.index.detach().cpu()
        tensors[f"{name}.weight"] = delta.weight.detach().cpu().contiguous()
        if delta.bias is not None:
            tensors[f"{name}.bias"] = delta.bias.detach().cpu().contiguous()
        layout[name] = {"is_input": delta.is_input, "in_features": delta.in_features,
                        "out_features": delta.out_features, "bias": delta.bias is not None}
    header = {"format": _FORMAT, "neft_trl.modules": json.dumps(layout)}
    header.update({k: str(v) for k, v in config.items() if v is not None})
    path = output_dir / DELTA_FILENAME
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    text = json.dumps(dict(config), indent=2, sort_keys=True)
    atomic_write(output_dir / DELTA_CONFIG_FILENAME, lambda tmp: tmp.write_text(text + "\n"))
    return path


def read_neuron_delta(path: str | os.PathLike) -> tuple[dict[str, NeuronDelta], dict[str, str]]:
    """The deltas of a file (on CPU, frozen) and its metadata; ``path`` is the file or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / DELTA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No neuron delta at {str(path)!r}: pass the output_dir of a neft_mode='delta' run (it holds "
            f"{DELTA_FILENAME}) or the file itself."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {_FORMAT!r}")
            layout = json.loads(meta["neft_trl.modules"])
            deltas = {name: _delta_from_file(f, name, spec) for name, spec in layout.items()}
    except (KeyError, ValueError, OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{str(path)!r} is not a valid neft_trl neuron delta file ({err}).") from err
    return deltas, meta


def _delta_from_file(f: Any, name: str, spec: Mapping[str, Any]) -> NeuronDelta:
    index = f.get_tensor(f"{name}.index")
    weight = f.get_tensor(f"{name}.weight")
    delta = NeuronDelta(index, bool(spec["is_input"]), int(spec["in_features"]), int(spec["out_features"]),
                        with_bias=bool(spec["bias"]), dtype=weight.dtype)
    if delta.weight.shape != weight.shape or (index.numel() and int(index.max()) >= delta.num_neurons):
        raise ValueError(f"{name}: weight {tuple(weight.shape)} / indices do not match its recorded layer shape")
    delta.weight.data.copy_(weight)
    if delta.bias is not None:
        delta.bias.data.copy_(f.get_tensor(f"{name}.bias"))
    return delta.requires_grad_(False)


def check_delta_fits(model: nn.Module, deltas: Mapping[str, NeuronDelta]) -> dict[str, nn.Module]:
    """The model's module for every delta; one ValueError naming every shape that differs otherwise."""
    install_expert_views(model)  # deltas of routed experts live on the experts' views
    modules = dict(model.named_modules())
    found, problems = {}, []
    for name, delta in deltas.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            problems.append(f"{name}: absent from this model")
            continue
        in_features, out_features = features(module)
        if (in_features, out_features) != (delta.in_features, delta.out_features):
            problems.append(f"{name}: delta made for [out={delta.out_features}, in={delta.in_features}], this model's "
                            f"layer is [out={out_features}, in={in_features}]")
        found[name] = module
    if problems:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"This neuron delta was trained on a different model than this {model_type!r} "
            f"({len(problems)} of {len(deltas)} projections differ): {'; '.join(problems[:4])}"
            f"{' ...' if len(problems) > 4 else ''}. Load the base model the delta was trained on "
            f"(see {DELTA_CONFIG_FILENAME})."
        )
    return found


def load_neuron_delta(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply a saved neuron delta to a base model (quantized or not) for inference; returns the same model.

    The base weights are not touched: each projection's output gets its delta added in forward, exactly as
    during training. The deltas are frozen; ``merge_neuron_delta`` folds them into plain weights instead.
    """
    deltas, _ = read_neuron_delta(path)
    for name, module in check_delta_fits(model, deltas).items():
        weight = module.weight
        attach_delta(module, deltas[name].to(weight.device))
    return model


def merge_neuron_delta(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A full-precision model with the deltas added to its weights, ready for ``save_pretrained``.

    A bitsandbytes model is first dequantized by transformers (``model.dequantize(dtype)``, which also drops
    its quantization config, so the saved folder loads with plain ``from_pretrained``); a full-precision model
    is merged in place. ``model`` must be the base model without deltas attached (after training, call
    ``trainer.neuron_training.detach()`` first).
    """
    if any(has_delta(m) for m in model.modules()):
        raise ValueError(
            "This model already carries neuron deltas (from training or load_neuron_delta): merge into the base "
            "model instead, e.g. call trainer.neuron_training.detach() first."
        )
    deltas, _ = read_neuron_delta(path)
    if any(is_quantized(m) for m in model.modules()):
        if getattr(model, "hf_quantizer", None) is None:
            raise ValueError(
                "Cannot merge into a model quantized outside transformers: load it with from_pretrained("
                "quantization_config=...) so that model.dequantize() works, or merge into the full-precision model."
            )
        model = dequantize(model, dtype)  # 4.57's dequantize() takes no dtype: see compat
    elif dtype is not None:
        model = model.to(dtype)
    for name, module in check_delta_fits(model, deltas).items():
        deltas[name].merge_into(module)
    return model
