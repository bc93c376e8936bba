"""Temporary instrumentation that data-driven selectors put on the model, and always take off again.

A selector must leave the model exactly as it found it (weights, ``requires_grad`` flags, hooks,
train/eval mode), whatever happens inside it. These context managers are the one place that does the
bookkeeping, so the activation, gradient and cosine-probe selectors cannot forget a step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..freezing import frozen_parameters
from ..layers import is_quantized


@contextmanager
def removing(handles: list[RemovableHandle]) -> Iterator[list[RemovableHandle]]:
    """Yield a list to append hook handles to; every handle is removed on exit, even after an error."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


@contextmanager
def model_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put the model in train or eval mode for the block; restore every submodule's own flag afterwards.

    Quantized layers stay in train mode: they have no dropout, and in eval mode without input gradients
    bitsandbytes (0.50, CPU) repacks 4-bit weights in place, which would change the frozen model.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    for module in model.modules():
        if is_quantized(module):
            module.training = True
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def frozen(model: nn.Module, input_grads: bool = False) -> Iterator[None]:
    """Freeze every parameter for the block, so a backward pass writes no weight gradient into the model.

    With ``input_grads`` the input embeddings' output requires grad, so activation gradients still flow
    through a fully frozen (or quantized) model. ``requires_grad`` flags are restored on exit.
    """
    with ExitStack() as stack:
        stack.enter_context(frozen_parameters(model))
        if input_grads:
            embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if embeddings is None:
                raise ValueError(
                    f"{type(model).__name__} has no get_input_embeddings(): neft_trl cannot make activation "
                    "gradients flow through it with frozen weights."
                )
            handles = stack.enter_context(removing([]))
            handles.append(embeddings.register_forward_hook(_require_grad))
        yield


def _require_grad(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True) if torch.is_grad_enabled() and not output.requires_grad else output


def flat_tokens(
    tensor: torch.Tensor, attention_mask: torch.Tensor | None, token_index: torch.Tensor | None = None
) -> torch.Tensor:
    """``[tokens, features]`` fp32 view of an activation, keeping only real (non-padding) tokens.

    ``token_index``: for an expert view's activation (routed tokens only), the positions of its rows in the
    flattened batch (``ExpertProjection.token_index``), so that padding routed to the expert is dropped too.
    """
    flat = tensor.reshape(-1, tensor.shape[-1]).float()
    if attention_mask is None:
        return flat
    if token_index is not None and token_index.numel() == flat.shape[0]:
        return flat[attention_mask.reshape(-1).to(flat.device)[token_index.to(flat.device)].bool()]
    if attention_mask.shape == tensor.shape[:-1]:
        flat = flat[attention_mask.reshape(-1).to(flat.device).bool()]
    return flat
