"""Neuron deltas under FSDP2 (``torch.distributed.fsdp.fully_shard``): what changes once they are sharded.

Delta mode works under FSDP2 because the deltas are ordinary child modules of the projections: attached
*before* ``fully_shard``, they join their decoder layer's parameter group, so FSDP2 shards them, all-gathers
them for forward and reduce-scatters (averages) their gradients like any other trainable parameter, while
the frozen base weights are only ever all-gathered. Three things differ from an unsharded model, and this
module holds them:

- after ``fully_shard`` every parameter is a ``DTensor`` holding this rank's shard: saving gathers the whole
  delta (``full``, a collective every rank must enter) and rank 0 writes (``writes_files``); loading a saved
  delta scatters it back (``copy_full_``);
- deltas attached *after* ``fully_shard`` would be plain tensors outside every FSDP group: never sharded,
  their gradients never averaged across ranks, so the ranks would silently drift apart. ``check_unsharded``
  refuses that (and every other in-place change of a sharded model: merging, detaching);
- hooks mode masks gradients of the original weights through tensor hooks, which ``fully_shard`` drops when
  it replaces the parameters by DTensors: hooks mode is refused there (``check_unsharded``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a parameter that ``fully_shard`` (or another DTensor API) split across ranks."""
    return isinstance(tensor, DTensor)


def sharded_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if is_sharded(param)]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is all-gathered (every rank must call this, in the same order); a plain
    tensor is returned as is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def copy_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole (unsharded) ``value`` into ``param``, which may be a DTensor: each rank keeps its own shard.

    Every rank must pass the same ``value`` (e.g. read from the same file) and call this in the same order.
    """
    if is_sharded(param):
        value = distribute_tensor(value.to(device=param.device, dtype=param.dtype), param.device_mesh,
                                  param.placements)
    param.copy_(value)


def writes_files() -> bool:
    """Whether this process writes shared files: rank 0 of the default process group, or a lone process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_unsharded(model: nn.Module, action: str) -> None:
    """Refuse ``action`` on a model whose parameters ``fully_shard`` already replaced by DTensors.

    ``action`` completes the sentence "Cannot ... on a model sharded by fully_shard", and the error says what
    works instead.
    """
    names = sharded_parameter_names(model)
    if not names:
        return
    raise ValueError(
        f"Cannot {action} on a model sharded by fully_shard ({len(names)} parameters are DTensors, e.g. "
        f"{names[0]}). Neuron deltas must exist before sharding, so FSDP2 shards them and averages their "
        "gradients: call apply_neurons(model, mask, mode='delta') on the unsharded model, then fully_shard. "
        "Hooks mode cannot run under FSDP at all (fully_shard drops its gradient hooks): use mode='delta'. "
        "To merge or detach trained deltas, save them (handle.save(dir), on every rank) and use "
        "neft_trl.merge_neuron_delta / load_neuron_delta on an unsharded base model."
    )
