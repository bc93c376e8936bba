"""Train a tiny Llama's neuron deltas with the functional API under FSDP2 (``fully_shard``), or on one process.

``tests/test_fsdp.py`` runs it under ``torchrun --nproc_per_node 2`` (gloo, CPU) and calls ``train_and_report``
in-process (no process group, no sharding) as the reference. Both runs draw the same global batches of 4
fixed-length sequences without padding; each rank trains on its half. Every rank's mean loss then covers the
same number of tokens, so FSDP2's averaged gradient is exactly the one-process gradient of the global batch,
and the runs differ only in float summation order. Each rank, like an FSDP2 user:

1. selects with the cosine selector on its own shard of the calibration batches; the ranks' masks differ,
   which ``apply_neurons`` refuses (the error is recorded); ``broadcast_mask`` then gives every rank rank 0's
   (the reference selects on the shard rank 0 sees, so it finds the same mask);
2. ``apply_neurons(model, mask, "delta")``, then ``fully_shard`` each decoder layer, then the root;
3. trains 3 SGD steps (a wrong gradient scale would move the deltas by ~lr * |grad|);
4. ``handle.save(out/saved)`` on every rank (the deltas are gathered; rank 0 writes), zeroes its deltas and
   loads them back from that file as a resume would (each rank keeps its shard of the whole saved delta);
5. records what a sharded model refuses (attaching deltas or hooks again, merging).

It writes, with safetensors and JSON only: ``rank{r}.safetensors`` (every parameter, gathered whole),
``rank{r}_mask.safetensors`` and ``rank{r}.json`` (losses, shard sizes, the refusal messages).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import make_model
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from neft_trl import apply_neurons, select_neurons
from neft_trl.distributed import broadcast_mask
from neft_trl.sharding import full

RANKS = 2  # of the sharded run, which the one-process reference mirrors
GLOBAL_BATCH = 4
SEQ_LEN = 12
STEPS = 3
LR = 0.5


def global_batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``GLOBAL_BATCH`` random token sequences (no padding; labels = inputs)."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 64, (GLOBAL_BATCH, SEQ_LEN), generator=g) for _ in range(count)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """The rows of a global batch that ``rank`` of ``world`` trains on."""
    return {k: v.chunk(world)[rank] for k, v in batch.items()}


def _refusal(action) -> str:
    """The message of the ValueError ``action()`` raises ('' if it raises none: the test then fails)."""
    try:
        action()
    except ValueError as err:
        return str(err)
    return ""


def train_and_report(output_dir: str) -> None:
    """Train as the module docstring says, on every rank of the process group or alone, and write the results."""
    sharded = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    os.makedirs(output_dir, exist_ok=True)
    report: dict = {"world_size": world}
    model = make_model("llama")
    calibration = [shard(b, rank, RANKS) for b in global_batches(2, seed=1)]  # the reference: rank 0's shard
    mask = select_neurons(model, calibration, "cosine", neuron_ratio=0.25, probe_steps=3, show_progress=False)
    if sharded:
        report["different_masks"] = _refusal(lambda: apply_neurons(model, mask, "delta"))
        mask = broadcast_mask(mask)
    handle = apply_neurons(model, mask, "delta")
    if sharded:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        report["delta_shard_rows"] = {n: d.weight.to_local().shape[0] for n, d in handle.deltas.items()}
    optimizer = handle.make_optimizer(torch.optim.SGD, lr=LR)
    model.train()
    losses = []
    for batch in global_batches(STEPS, seed=2):
        loss = model(**shard(batch, rank, world)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if sharded:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())
    report["losses"] = losses
    handle.save(Path(output_dir) / "saved")
    if sharded:
        dist.barrier()  # rank 0 has written the file every rank now reads
    with torch.no_grad():
        for delta in handle.deltas.values():
            delta.weight.zero_()
    handle.load(Path(output_dir) / "saved")  # the parameters written below are these reloaded ones
    if sharded:
        report["attach_again"] = _refusal(lambda: apply_neurons(model, mask, "delta"))
        report["hooks"] = _refusal(lambda: apply_neurons(model, mask, "hooks"))
        report["merge"] = _refusal(handle.merge)

    params = {n: full(p).detach().cpu().contiguous() for n, p in model.named_parameters()}  # every rank gathers
    prefix = os.path.join(output_dir, f"rank{rank}")
    save_file(params, f"{prefix}.safetensors")
    mask.save(f"{prefix}_mask.safetensors")
    with open(f"{prefix}.json", "w") as f:
        json.dump(report, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    if dist.get_world_size() != RANKS:
        raise SystemExit(f"Run under torchrun --nproc_per_node {RANKS}: the reference mirrors {RANKS} ranks.")
    try:
        train_and_report(args.output_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
