"""GPU check: ``NeFTSFTTrainer`` in delta mode under accelerate FSDP2 (``fsdp_config={"version": 2}``).

accelerate never enables FSDP on a CPU run, so this path cannot be tested by the CPU suite (which checks raw
``fully_shard`` on two gloo ranks instead: tests/test_fsdp.py). On a CUDA machine, from the repository root:

    python -m benchmarks.gpu_fsdp2_check                         # one GPU, world size 1 (~30 s)
    torchrun --nproc_per_node 2 -m benchmarks.gpu_fsdp2_check    # two GPUs
    python -m benchmarks.gpu_fsdp2_check --bf16                  # accelerate's bf16 mixed precision policy
    python -m benchmarks.gpu_fsdp2_check --no_fsdp               # the same run without FSDP (any device)

It trains tests/conftest.py's tiny random Llama (cosine selection, 25% of the neurons) and asserts, on every
rank: accelerate wrapped the model with FSDP2 and the neuron deltas are among its sharded DTensors (so FSDP2
reduces their gradients); every base weight is bit-identical after training; every delta trained; the loss
went down; ``save_model`` wrote ``neft_delta.safetensors`` equal to the trained deltas, and the mask. It prints
``PASS`` and the numbers, or stops at the first failed assertion.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's tiny model and data
from conftest import make_dataset, make_model, make_tokenizer  # noqa: E402

from neft_trl import NeFTConfig, NeFTSFTTrainer, NeuronMask  # noqa: E402
from neft_trl.sharding import full, is_sharded  # noqa: E402
from neft_trl.training.delta_io import read_neuron_delta  # noqa: E402


def launch_as_one_process() -> None:
    """FSDP needs a distributed launch: without torchrun, describe a world of one process (this one)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))


def check(args: argparse.Namespace, output_dir: str) -> None:
    fsdp = {} if args.no_fsdp else {"fsdp": "full_shard auto_wrap", "fsdp_config": {
        "version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    config = NeFTConfig(
        output_dir=output_dir, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=3e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], max_length=32, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, neft_mode="delta", selector="cosine", neuron_ratio=0.25,
        bf16=args.bf16, **fsdp,
    )
    trainer = NeFTSFTTrainer(make_model("llama"), make_dataset(128), args=config, processing_class=make_tokenizer())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    rank = trainer.accelerator.process_index

    deltas = trainer.neuron_training.deltas
    assert trainer.is_fsdp_enabled != args.no_fsdp, trainer.accelerator.distributed_type
    if not args.no_fsdp:
        assert trainer.accelerator.is_fsdp2 and trainer.neuron_training.sharded, "the deltas were not sharded"
        assert all(is_sharded(d.weight) for d in deltas.values())
    trained = {n: full(p).detach().float().cpu() for n, p in trainer.model.named_parameters()}  # all ranks gather
    for name, before in make_model("llama").named_parameters():
        assert torch.equal(trained[name], before.detach()), f"frozen weight {name} changed"
    names = [n for n in trained if ".neft_delta." in n]
    assert len(names) == len(deltas) and all(trained[n].abs().sum() > 0 for n in names), "a delta did not train"
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05, f"the loss did not go down: first 5 steps {first:.3f}, last 5 {last:.3f}"

    trainer.save_model(output_dir)  # every rank: gathers the sharded deltas; rank 0 writes
    if trainer.args.should_save:
        saved, _ = read_neuron_delta(output_dir)
        for name, delta in saved.items():
            assert torch.equal(delta.weight.float(), trained[f"{name}.neft_delta.weight"]), name
        assert NeuronMask.load(output_dir) == trainer.neuron_mask
    print(f"PASS rank {rank}: {trainer.accelerator.distributed_type}, fsdp2={not args.no_fsdp}, bf16={args.bf16}, "
          f"{len(deltas)} deltas, {trainer.neuron_mask.num_selected} neurons, loss {first:.3f} -> {last:.3f} "
          f"over {len(losses)} steps, {seconds:.1f} s training")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--bf16", action="store_true", help="mixed precision bf16 (FSDP2 MixedPrecisionPolicy)")
    parser.add_argument("--no_fsdp", action="store_true", help="the same run without FSDP, e.g. on a CPU")
    parser.add_argument("--output_dir", help="where save_model writes (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not args.no_fsdp:
        if not torch.cuda.is_available():
            raise SystemExit("accelerate enables FSDP on CUDA devices only: run this on a GPU machine, or --no_fsdp.")
        launch_as_one_process()
    if args.output_dir:
        check(args, args.output_dir)
        return
    with tempfile.TemporaryDirectory() as output_dir:
        check(args, output_dir)


if __name__ == "__main__":
    main()
