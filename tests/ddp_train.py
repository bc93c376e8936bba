"""Train a tiny model with ``NeFTSFTTrainer`` on one or more processes and write what the tests compare.

``tests/test_distributed.py`` runs it under ``torchrun --nproc_per_node 2`` (real DDP over gloo on CPU)
and with plain ``python`` (one process, the same global batch) as the reference. Every rank writes, with
safetensors and JSON only:

- ``rank{r}.safetensors``: every named parameter after training (base weights and, in delta mode, deltas);
- ``rank{r}_mask.safetensors``: the mask this rank trained;
- ``rank{r}_scores.safetensors``: the scores the ``grad_norm`` test selector computed on THIS rank's
  batches (so the test can see that ranks scored differently, yet trained rank 0's mask);
- ``rank{r}.json``: accelerate's distributed type, world size, the logged losses.

``grad_norm`` is a deliberately data-driven selector: it draws batches from the prepared train dataloader
and calls the trainer's ``compute_loss`` (which gathers metrics across ranks), the two places where a
rank-0-only selection would deadlock.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from conftest import make_dataset, make_model, make_tokenizer
from safetensors.torch import save_file
from transformers import HfArgumentParser

from neft_trl import NeFTConfig, NeFTSFTTrainer, NeuronSelector, hookimpl, register_plugin


@dataclass
class ScriptArgs:
    output_dir: str = field(metadata={"help": "Where every rank writes its results."})
    mode: str = field(default="hooks", metadata={"help": "neft_mode: hooks or delta."})
    selector: str = field(default="grad_norm", metadata={"help": "Selector to run (grad_norm is defined here)."})
    batch_size: int = field(default=2, metadata={"help": "per_device_train_batch_size."})
    steps: int = field(default=3, metadata={"help": "max_steps."})
    grad_accum: int = field(default=1, metadata={"help": "gradient_accumulation_steps."})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer (sgd makes a wrong gradient scale show)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (frozen neurons must not decay)."})
    mask_path: str | None = field(default=None, metadata={"help": "Train this saved mask instead of selecting."})
    find_unused: bool = field(default=False, metadata={"help": "ddp_find_unused_parameters (NeFT needs False only)."})
    use_cpu: bool = field(default=True, metadata={"help": "TrainingArguments.use_cpu (False shows the silent case)."})


class GradNormSelector(NeuronSelector):
    """Scores each neuron by the norm of its loss gradient over a few batches (test-only, data-driven)."""

    name = "grad_norm"
    keep = "highest"
    last_scores: dict[str, torch.Tensor] = {}

    def score(self, context):
        projections = [p for g in context.neuron_map.groups for p in g.projections]
        weights = [p.module.weight for p in projections]
        totals = {p.name: torch.zeros(p.num_neurons) for p in projections}
        for batch in context.batches(2):
            loss = context.compute_loss(context.model, batch)
            for proj, grad in zip(projections, torch.autograd.grad(loss, weights), strict=True):
                totals[proj.name] += grad.float().norm(dim=1 - proj.neuron_dim).cpu()
        scores = {g.key: sum(totals[p.name] for p in g.projections) for g in context.neuron_map.groups}
        GradNormSelector.last_scores = scores
        return scores


@hookimpl
def neft_register_selectors(register):
    register(GradNormSelector)


def train_and_report(script: ScriptArgs) -> None:
    """Train as ``script`` says and write this rank's results (also called in-process for the reference run)."""
    os.makedirs(script.output_dir, exist_ok=True)
    launched_by_torchrun = "WORLD_SIZE" in os.environ  # accelerate 1.15 fails on ddp_backend without a process group
    args = NeFTConfig(
        output_dir=os.path.join(script.output_dir, "trainer"), per_device_train_batch_size=script.batch_size,
        gradient_accumulation_steps=script.grad_accum, max_steps=script.steps, learning_rate=1e-2,
        optim=script.optim, weight_decay=script.weight_decay, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=script.use_cpu, ddp_backend="gloo" if script.use_cpu and launched_by_torchrun else None, seed=0,
        max_length=32, disable_tqdm=True, dataloader_num_workers=0, neft_mode=script.mode, selector=script.selector,
        neuron_ratio=0.25, neuron_mask_path=script.mask_path, ddp_find_unused_parameters=script.find_unused,
    )
    trainer = NeFTSFTTrainer(make_model("llama"), make_dataset(32), args=args, processing_class=make_tokenizer())
    trainer.train()

    rank = trainer.accelerator.process_index
    prefix = os.path.join(script.output_dir, f"rank{rank}")
    model = trainer.accelerator.unwrap_model(trainer.model)
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}, f"{prefix}.safetensors")
    trainer.neuron_mask.save(f"{prefix}_mask.safetensors")
    if GradNormSelector.last_scores:
        save_file({k: v.contiguous() for k, v in GradNormSelector.last_scores.items()}, f"{prefix}_scores.safetensors")
    report = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_processes": trainer.accelerator.num_processes,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    with open(f"{prefix}.json", "w") as f:
        json.dump(report, f)


def main() -> None:
    (script,) = HfArgumentParser(ScriptArgs).parse_args_into_dataclasses()
    register_plugin(sys.modules[__name__], name="ddp-test-grad-norm")
    train_and_report(script)


if __name__ == "__main__":
    main()
