"""Multi-process training: every rank trains the same neurons, and setups that cannot do that are refused.

Selection: EVERY rank runs the selector, in lockstep, on its own shard of the trainer's prepared train
dataloader; then rank 0's mask is broadcast and every rank trains exactly that mask. Rank 0 alone cannot
select, because selection is full of collectives that all ranks must enter together: the trainer's
``compute_loss`` gathers its metrics across ranks (TRL's ``SFTTrainer`` calls ``gather_for_metrics``),
accelerate's dataloaders may synchronise RNG states or dispatch batches from rank 0, and a third-party
selector may call anything. On rank 0 only, any of these would hang the job (seen with a data-driven
selector under ``torchrun``). The other ranks' selections cost no wall time (they would otherwise wait)
and are discarded; a rank whose own selection differed logs by how much. Scores are not averaged across
ranks: a selector's score need not be averageable (ranks, cosines of separate probes), and rank 0's mask
is exactly what the selector returned. Data-driven selectors thus score rank 0's shard of the data: the
same number of batches of the same per-device size as on one process. Plugin authors: make the same
number of ``compute_loss`` calls on every rank (a fixed batch count, no data-dependent early exit).
The cosine probe trains its own deltas on the unwrapped model with its own optimizer: no DDP hooks and
no gradient all-reduce, so it never waits on another rank.

Sharded training: ``delta`` mode runs under FSDP2 (``fully_shard``) when the deltas exist before the model
is wrapped (``sharding.py``). ``hooks`` mode masks rows of the original weights through tensor hooks, which
FSDP (flat or DTensor parameters, hooks lost when parameters are replaced) and DeepSpeed ZeRO-3
(partitioned parameters) break, so they are refused with the settings that work. See
``check_sharded_setup``. Outside the Trainer, ``apply_neurons`` checks that every rank got the same mask
(``check_same_mask``): ranks that train different neurons under DDP or FSDP2 would silently diverge.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from .errors import UsageError
from .mask import NeuronMask
from .neurons import NeuronMap

logger = logging.getLogger("neft_trl")

LAUNCHERS = (
    "On CPU: torchrun --nproc_per_node N train.py with NeFTConfig(use_cpu=True, ddp_backend='gloo'). "
    "On GPUs: torchrun --nproc_per_node N train.py, or accelerate launch --num_processes N train.py."
)


def check_launch(accelerator: Any) -> None:
    """Refuse a job launched as several processes in which each process would train alone.

    ``torchrun`` sets ``WORLD_SIZE``; if accelerate nevertheless ends up with one process (on a CPU machine
    without ``use_cpu=True`` it picks ``DistributedType.NO``), every rank silently trains its own model on
    all the data and the ranks diverge.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"Launched as {world_size} processes (WORLD_SIZE={world_size}) but accelerate set up "
            f"{accelerator.distributed_type} with 1 process, so each process would train alone and the ranks would "
            f"diverge. {LAUNCHERS} Or run a single process (python train.py)."
        )


def check_sharded_setup(trainer: Any, mode: str) -> None:
    """Refuse FSDP and DeepSpeed setups where the training mode cannot hold the mask (see the README section).

    - FSDP2 (``fsdp_config={"version": 2}``) in delta mode works: ``NeFTSFTTrainer.train`` attaches the
      deltas before accelerate wraps the model, so FSDP2 shards them and averages their gradients. Hooks
      mode is refused under FSDP (``fully_shard`` replaces the parameters and drops their gradient hooks;
      FSDP1 flattens them, so no hook could mask rows), and so is FSDP1 in delta mode (its flat parameters
      mix frozen weights with the deltas, and it is deprecated in transformers).
    - DeepSpeed ZeRO-3 partitions every weight, so neither selection (which reads whole weights) nor the
      masks fit: refused. ZeRO-0/1/2 keep whole weights on every rank and work in both modes, except:
      an ``optimizer`` section in the DeepSpeed config (DeepSpeed would build it over every parameter
      before NeFT selects: a silent full fine-tune), and hooks mode with ``weight_decay > 0`` (DeepSpeed
      steps flat fp32 copies, so the decay hooks mode applies to the selected neurons would be skipped).
    """
    args = trainer.args
    if getattr(trainer, "is_fsdp_enabled", False):
        version = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if mode == "hooks":
            raise UsageError(
                "neft_mode='hooks' does not support FSDP: FSDP replaces or flattens the parameters, so the gradient "
                "hooks that mask their rows are lost. Use neft_mode='delta' with FSDP2 (fsdp_config={'version': 2}), "
                f"or DDP (drop fsdp/fsdp_config; {LAUNCHERS})."
            )
        if version != 2:
            raise UsageError(
                f"NeFT's delta mode supports FSDP2 only, this run uses FSDP{version}: FSDP1 flattens the frozen "
                "weights and the neuron deltas into shared flat parameters. Set fsdp_config={'version': 2} (the "
                f"default of transformers 5), or use DDP ({LAUNCHERS})."
            )
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if not isinstance(stage, int):
        raise UsageError(f"DeepSpeed zero_optimization.stage is {stage!r}: set it to 0, 1 or 2 (NeFT refuses ZeRO-3).")
    if stage >= 3:
        raise UsageError(
            "NeFT does not support DeepSpeed ZeRO-3: it partitions every weight, so neurons can be neither scored "
            "(selection reads whole weight rows) nor masked. Use zero_optimization.stage 2 (or 1): NeFT's "
            "gradients and optimizer state are already small, and ZeRO-2 shards them."
        )
    if "optimizer" in config:
        raise UsageError(
            "Remove the 'optimizer' section from the DeepSpeed config: DeepSpeed would build that optimizer over "
            "every parameter before NeFT selects its neurons (a silent full fine-tune). Set the optimizer through "
            "NeFTConfig (optim, learning_rate, weight_decay) and NeFT builds it over the selected neurons."
        )
    if mode == "hooks" and args.weight_decay:
        raise UsageError(
            f"neft_mode='hooks' with weight_decay={args.weight_decay} under DeepSpeed: DeepSpeed steps flat fp32 "
            "copies of the weights, so the decay that hooks mode applies to the selected neurons only would be "
            "skipped. Use weight_decay=0 (the paper's setting) or neft_mode='delta'."
        )


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def broadcast_mask(mask: NeuronMask, neuron_map: NeuronMap | None = None, accelerator: Any = None) -> NeuronMask:
    """Every rank passes its own mask; every rank gets rank 0's (see the module docstring for why all select).

    Without ``accelerator`` the default ``torch.distributed`` process group is used (a custom loop:
    ``mask = broadcast_mask(select_neurons(...))`` on every rank). ``neuron_map``: check that the mask fits it.
    """
    rank, world_size = (accelerator.process_index, accelerator.num_processes) if accelerator else _world()
    if world_size == 1:
        return mask
    payload = [(mask.selected, mask.info, mask.metadata) if rank == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    selected, info, metadata = payload[0]
    received = NeuronMask({n: torch.as_tensor(t) for n, t in selected.items()}, info, metadata)
    if neuron_map is not None:
        received.check_fits(neuron_map)
    if rank != 0 and received != mask:
        differing = sum(int((received.selected[n] != mask.selected[n]).sum()) for n in received.selected
                        if n in mask.selected and mask.selected[n].shape == received.selected[n].shape)
        logger.info(
            "NeFT: rank %d's own selection differed from rank 0's in %d neurons (it scored another shard of the "
            "data); every rank trains rank 0's mask.", rank, differing,
        )
    return received


def mask_digest(mask: NeuronMask) -> str:
    """A short fingerprint of which neurons ``mask`` selects (names and bits, not metadata)."""
    digest = hashlib.sha256()
    for name in sorted(mask.selected):
        digest.update(name.encode())
        digest.update(mask.selected[name].numpy().tobytes())
    return digest.hexdigest()


def check_same_mask(mask: NeuronMask) -> None:
    """Refuse, on every rank, a mask that differs between the ranks of the default process group.

    Every rank must call this (an ``all_gather`` of fingerprints); a single process returns at once. Ranks
    that select on their own shard of the data get different masks, and would train different neurons:
    under DDP the averaged gradients then move neurons that some rank keeps frozen, under FSDP2 the delta
    shapes do not even agree.
    """
    rank, world_size = _world()
    if world_size == 1:
        return
    digests: list[str | None] = [None] * world_size
    dist.all_gather_object(digests, mask_digest(mask))
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise ValueError(
            f"Rank {rank}: ranks {differing} hold another neuron mask than rank 0, so they would train other "
            "neurons. Make the mask identical on every rank: mask = neft_trl.distributed.broadcast_mask(mask) "
            "after select_neurons (every rank then trains rank 0's), or load one saved mask file on every rank."
        )
