"""What NeFT needs to know about one projection layer, whatever its class.

NeFT touches four kinds of layers: ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored transposed,
``[in, out]``), and bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` whose ``weight`` is packed and
cannot take gradients. Everything else in the package asks this module for shapes and dense weights,
so no other file branches on the layer class.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import UsageError


def is_transposed(module: nn.Module) -> bool:
    """True where the weight is stored ``[in_features, out_features]`` (GPT-2's ``Conv1D``)."""
    return isinstance(module, Conv1D)


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes 4-bit and 8-bit layers, whose weights cannot be trained directly."""
    weight = getattr(module, "weight", None)
    return type(weight).__name__ in {"Params4bit", "Int8Params"}


def is_quantized_model(model: nn.Module) -> bool:
    """True where the model holds bitsandbytes layers; any other quantization (GPTQ, AWQ, ...) is an error.

    neft_trl trains full-precision models and bitsandbytes 4/8-bit models; other quantized layers are not
    ``nn.Linear``, so their neurons could be neither found nor trained.
    """
    bnb = any(is_quantized(m) for m in model.modules())
    if getattr(model, "is_quantized", False) and not bnb:
        method = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
        method = getattr(method, "quant_method", "an unsupported method")
        raise UsageError(
            f"This model is quantized with {method}, which NeFT cannot train: load it in full precision, or "
            "4/8-bit with BitsAndBytesConfig (quantization_config=BitsAndBytesConfig(load_in_4bit=True))."
        )
    return bnb


def is_supported_layer(module: nn.Module) -> bool:
    """Layers whose neurons NeFT can train: plain or quantized linear layers and ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of the layer as a function, independent of storage layout."""
    if is_transposed(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense fp32 ``[out_features, in_features]`` tensor (a copy where needed).

    Quantized weights are dequantized; ``Conv1D`` weights are transposed. Selectors compare these tensors,
    so they must be exact fp32 values of what the forward pass uses.
    """
    weight = module.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        dense = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    elif kind == "Int8Params":
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        dense = weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
    else:
        dense = weight.detach()
        if is_transposed(module):
            dense = dense.t()
    return dense.float()


def parameter_count(model: nn.Module) -> int:
    """All parameters of the model, counting quantized weights by their logical size, not their packed bytes."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if is_quantized(module):
            in_features, out_features = features(module)
            total += in_features * out_features - module.weight.numel()
    return total
