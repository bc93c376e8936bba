"""One projection's neuron delta: a small tensor holding only the selected neurons, added in forward.

The base layer (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes ``Linear4bit``/``Linear8bitLt``) is never
written and never unwrapped: its forward runs unchanged, and a forward hook adds the delta's share to its
output, the way PEFT adds a LoRA output to a ``Linear4bit``. That is why the same code serves every layer
class: only the layer's *function* ``y = x W^T (+ b)`` matters, never its storage.

The delta is stored in the functional ``[out, in]`` layout whatever the base layer stores:

* an "in" neuron (row ``n`` of up/gate) owns output feature ``n``: ``weight`` is ``[k, in]`` and the output
  gets ``x @ weight^T (+ bias)`` added at the selected features (``index_add``);
* an "out" neuron (column ``n`` of down) owns input feature ``n``: ``weight`` is ``[out, k]`` and the output
  gets ``x[..., index] @ weight^T`` (a gather).

The delta lives as a child module ``neft_delta`` of the projection, so its parameters appear in
``model.named_parameters()`` (the Trainer builds its optimizer from there) under readable names such as
``model.layers.0.mlp.up_proj.neft_delta.weight``, and no module of the base model is renamed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..layers import features, is_transposed
from ..sharding import full

DELTA_ATTRIBUTE = "neft_delta"


class NeuronDelta(nn.Module):
    """Trainable values for ``index`` neurons of one projection, starting at zero (the model is unchanged).

    Args:
        index: sorted neuron indices ``[k]`` (rows for ``is_input``, columns otherwise).
        is_input: True for an up/gate projection ("in" neurons), False for down ("out" neurons).
        in_features, out_features: the base layer's function shape.
        with_bias: also hold a bias delta ``[k]`` (an in-neuron's bias element belongs to it).
        dtype, device: where the delta lives; fp32 by default, whatever the base layer's dtype, so that
            small optimizer updates are not rounded away.
    """

    def __init__(
        self,
        index: torch.Tensor,
        is_input: bool,
        in_features: int,
        out_features: int,
        with_bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if with_bias and not is_input:
            raise ValueError("A bias delta belongs to in-neurons only: the output projection's bias is shared.")
        self.is_input = is_input
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("index", index.to(device=device, dtype=torch.long), persistent=False)
        k = self.index.numel()
        shape = (k, in_features) if is_input else (out_features, k)
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(k, dtype=dtype, device=device)) if with_bias else None
        self.hook_handle: torch.utils.hooks.RemovableHandle | None = None  # set by attach_delta
        self.covers_all = torch.equal(self.index.cpu(), torch.arange(self.num_neurons))

    @property
    def num_neurons(self) -> int:
        """How many neurons the base layer has (the size of the dimension ``index`` points into)."""
        return self.out_features if self.is_input else self.in_features

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The base layer's output ``out`` for input ``x``, with this delta's contribution added.

        A delta over every neuron (the cosine probe's) is a plain full-size ``x D^T``: the gather/scatter would
        add the same numbers, only slower.
        """
        if self.covers_all:
            return out + nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(out.dtype)
        if self.is_input:
            extra = nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)
            return out.index_add(-1, self.index, extra.to(out.dtype))
        picked = x.index_select(-1, self.index).to(self.weight.dtype)
        return out + nn.functional.linear(picked, self.weight).to(out.dtype)

    @torch.no_grad()
    def full_copy(self) -> NeuronDelta:
        """A frozen CPU copy of the whole delta. Under ``fully_shard`` the parameters are DTensors holding one
        rank's shard: this gathers them, so every rank must call it, in the same order (see ``sharding.py``)."""
        weight = full(self.weight).detach().cpu()
        copy = NeuronDelta(self.index.cpu(), self.is_input, self.in_features, self.out_features,
                           with_bias=self.bias is not None, dtype=weight.dtype)
        copy.weight.data.copy_(weight)
        if self.bias is not None:
            copy.bias.data.copy_(full(self.bias).detach().cpu())
        return copy.requires_grad_(False)

    @torch.no_grad()
    def dense(self) -> torch.Tensor:
        """The delta as a full ``[out, in]`` fp32 tensor (zeros outside the selected neurons), for merging."""
        full = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.weight.device)
        if self.is_input:
            full[self.index] = self.weight.float()
        else:
            full[:, self.index] = self.weight.float()
        return full

    def stored(self, module: nn.Module) -> tuple[int, torch.Tensor]:
        """``(dim, values)``: the dimension of ``module.weight`` that indexes neurons, and this delta in that layout."""
        transposed = is_transposed(module)
        dim = (0 if self.is_input else 1) ^ int(transposed)
        return dim, (self.weight.t() if transposed else self.weight)

    @torch.no_grad()
    def merge_into(self, module: nn.Module) -> None:
        """Add this delta to a full-precision layer's own weight (and bias), in place, on the selected neurons only.

        Only the selected rows/columns are written (``index_add_``), so every other element keeps its exact bits.
        """
        weight = module.weight
        dim, values = self.stored(module)
        weight.index_add_(dim, self.index.to(weight.device), values.to(device=weight.device, dtype=weight.dtype))
        if self.bias is not None:
            module.bias.index_add_(0, self.index.to(module.bias.device), self.bias.to(module.bias.dtype))

    @torch.no_grad()
    def selected_slices(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copies of the weight (and bias) slices this delta merges into, so a merge can be undone bit-exactly."""
        dim, _ = self.stored(module)
        index = self.index.to(module.weight.device)
        bias = module.bias.index_select(0, index) if self.bias is not None else None
        return module.weight.index_select(dim, index), bias

    @torch.no_grad()
    def restore_slices(self, module: nn.Module, slices: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Write back what ``selected_slices`` copied: the layer's exact pre-merge values."""
        dim, _ = self.stored(module)
        index = self.index.to(module.weight.device)
        module.weight.index_copy_(dim, index, slices[0])
        if slices[1] is not None:
            module.bias.index_copy_(0, index, slices[1])

    def extra_repr(self) -> str:
        kind = "rows" if self.is_input else "columns"
        return f"{self.index.numel()} {kind} of {self.num_neurons}, weight={tuple(self.weight.shape)}"


def _add_delta(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, DELTA_ATTRIBUTE)(args[0], output)


def has_delta(module: nn.Module) -> bool:
    return isinstance(getattr(module, DELTA_ATTRIBUTE, None), NeuronDelta)


def attach_delta(module: nn.Module, delta: NeuronDelta) -> None:
    """Make ``delta`` a child of ``module`` and add it to every forward output of ``module``."""
    if has_delta(module):
        raise ValueError(
            f"{type(module).__name__} already carries a neuron delta: load or train deltas on a fresh base model, "
            "or detach the first ones (DeltaTraining.detach / detach_delta)."
        )
    in_features, out_features = features(module)
    if (delta.in_features, delta.out_features) != (in_features, out_features):
        raise ValueError(
            f"Neuron delta for a layer of shape [out={delta.out_features}, in={delta.in_features}] cannot attach to "
            f"a layer of shape [out={out_features}, in={in_features}]."
        )
    module.add_module(DELTA_ATTRIBUTE, delta)
    delta.hook_handle = module.register_forward_hook(_add_delta)


@contextmanager
def attached_deltas(deltas: Mapping[nn.Module, NeuronDelta]) -> Iterator[None]:
    """Each delta attached to its layer for the block, and detached again on exit, even after an error."""
    with ExitStack() as stack:
        for module, delta in deltas.items():
            attach_delta(module, delta)
            stack.callback(detach_delta, module)
        yield


def detach_delta(module: nn.Module) -> NeuronDelta:
    """Undo ``attach_delta``: the layer computes its base function again. Returns the removed delta."""
    delta = getattr(module, DELTA_ATTRIBUTE)
    delta.hook_handle.remove()
    delattr(module, DELTA_ATTRIBUTE)
    return delta
