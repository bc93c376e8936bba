"""Run ONE benchmark method in this process and write its numbers as JSON.

    python -m benchmarks.run_method --method neft-delta-cosine --learning_rate 1e-3 --seed 0 --output r.json

One method per process, so that peak RSS (``resource.getrusage``) belongs to that method alone. The driver
(``benchmarks/compare.py``) starts one of these per method, learning rate and seed. Every method gets the
same model (SmolLM2-135M-Instruct by default, fp32 or 4-bit nf4), the same data (Django En->X pairs with a
fixed held-out test split and a small dev split for choosing the learning rate), the same optimizer
(AdamW, linear decay, no warmup unless ``--warmup_ratio``, weight decay 0, no dropout, no gradient
checkpointing) and the same steps.

Two regimes: the short one (``--max_steps``, test loss every ``--eval_steps``, the final model is reported)
and the long one (``--epochs``: that many passes over the training pairs, test and dev loss every half epoch,
the model of the best dev evaluation is reported, see ``checkpoint.py``). Both measure forgetting: the loss
on general English prose (``forgetting.py``) before and after training.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser

from neft_trl.atomic import atomic_write
from neft_trl.budget import Budget
from neft_trl.demo.arguments import PairDataArguments, pair_datasets
from neft_trl.demo.evaluation import evaluate_translations
from neft_trl.demo.measure import StepTimer, peak_rss_mb
from neft_trl.demo.models import load_model_and_tokenizer

from .methods import Method, lora_rank_for, neft_trainable_parameters, parse_method
from .regime import Regime, schedule
from .variants import merge_selector_kwargs, overrides

logger = logging.getLogger("benchmarks")
SPLIT_SEED = 0  # the data split never changes with the training seed: every run sees the same test pairs


@dataclass(kw_only=True)
class RunArguments(PairDataArguments):
    """One run: a method, its learning rate and seed, and the shared setting every method gets (data flags:
    ``PairDataArguments``, with 200 test and 60 dev pairs)."""

    method: str = field(metadata={"help": "full, lora, qlora, neft-hooks-<sel>, neft-delta-<sel>, qneft-delta-<sel>, "
                                          "base or qbase (see benchmarks/methods.py)."})
    output: str = field(metadata={"help": "Where to write the JSON result."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW, linear decay)."})
    seed: int = field(default=0, metadata={"help": "Training seed (selection, data order, init)."})
    model: str | None = field(default=None, metadata={"help": "Model id/folder/.gguf; default SmolLM2-135M-Instruct."})
    test_size: int = field(default=200, metadata={"help": "Held-out test pairs (eval loss, chrF)."})
    dev_size: int = field(default=60, metadata={"help": "Dev pairs from the train side, for the learning-rate sweep."})
    chat: bool | None = field(default=None, metadata={"help": "Chat prompts (default: if the tokenizer has a "
                                                               "chat template)."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps (the short regime)."})
    epochs: float = field(default=0.0, metadata={"help": "The long regime: train this many epochs over the training "
                                                          "pairs (overrides --max_steps and --eval_steps: test and dev "
                                                          "loss every half epoch; the best dev checkpoint is "
                                                          "reported). 0: the short regime."})
    max_train_pairs: int = field(default=0, metadata={"help": "Use only the first this many training pairs (0: all; "
                                                               "the quick mode's small long regime)."})
    prose_size: int = field(default=64, metadata={"help": "Prose paragraphs of the forgetting probe (0: no probe)."})
    batch_size: int = field(default=8, metadata={"help": "Train batch size."})
    eval_batch_size: int = field(default=32, metadata={"help": "Eval and generation batch size."})
    eval_steps: int = field(default=10, metadata={"help": "Held-out eval loss every this many steps (the curve); "
                                                            "0: only before and after training."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of the steps with a linear learning-rate "
                                                                "warmup (the same for every method; 0: none)."})
    max_length: int = field(default=128, metadata={"help": "Max tokens per training example."})
    param_ratio: float = field(default=0.018, metadata={"help": "NeFT budget (share of all parameters); LoRA's "
                                                                "rank is chosen to match it."})
    selector_kwargs: str | None = field(default=None, metadata={"help": "JSON kwargs for the NeFT selector."})
    generate: bool = field(default=True, metadata={"help": "Measure chrF/BLEU by greedy generation after training."})
    max_new_tokens: int = field(default=32, metadata={"help": "Generation length limit for chrF."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: torch's choice)."})


def load_model(args: RunArguments, method: Method):
    kwargs = {}
    if method.quantized:
        from transformers import BitsAndBytesConfig

        # fp32 compute on CPU for both 4-bit methods; nf4 + double quantization as in the QLoRA paper.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    return load_model_and_tokenizer(args.model, dtype=torch.float32, show_progress=False, **kwargs)


def training_config(args: RunArguments, method: Method, output_dir: str) -> Any:
    """The same ``SFTConfig`` settings for every method (a ``NeFTConfig`` for NeFT, with its budget and variants)."""
    from trl import SFTConfig

    from neft_trl import NeFTConfig

    common = dict(
        output_dir=output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate, lr_scheduler_type="linear",
        warmup_steps=round(args.warmup_ratio * args.max_steps), weight_decay=0.0,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size, max_length=args.max_length, gradient_checkpointing=False,
        eval_strategy="steps" if args.eval_steps else "no", eval_steps=args.eval_steps or None,
        logging_steps=args.eval_steps or args.max_steps, save_strategy="no",
        report_to=[], seed=args.seed, data_seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
        bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
    )
    if method.family == "base":  # only evaluates; NeFT's trainer because it accepts a 4-bit model without adapter
        return NeFTConfig(**common, selector="random", param_ratio=args.param_ratio)
    if method.family != "neft":
        return SFTConfig(**common)
    variant = overrides(method.variants, args.max_steps)
    kwargs = merge_selector_kwargs(json.loads(args.selector_kwargs or "{}"), variant.selector_kwargs, method.name)
    return NeFTConfig(**common, neft_mode=method.mode, selector=method.selector, param_ratio=args.param_ratio,
                      selector_kwargs=kwargs, **variant.config)


def build_trainer(args: RunArguments, method: Method, model: Any, tokenizer: Any, data: tuple, output_dir: str,
                  timer: StepTimer, regime: Regime) -> tuple[Any, dict[str, Any]]:
    """The method's trainer and the facts that describe its setup (LoRA rank, NeFT budget in parameters)."""
    from trl import SFTTrainer

    from neft_trl import NeFTSFTTrainer

    config = training_config(args, method, output_dir)
    common = dict(args=config, train_dataset=data[0], eval_dataset=regime.eval_dataset(data),
                  processing_class=tokenizer, callbacks=[timer, *regime.callbacks])
    budget_params = neft_trainable_parameters(model, Budget.resolve(param_ratio=args.param_ratio))
    facts: dict[str, Any] = {"neft_budget_parameters": budget_params}
    if method.family in ("neft", "base"):
        return NeFTSFTTrainer(model, **common), facts
    if method.family == "lora":
        from peft import LoraConfig

        rank = lora_rank_for(model, budget_params)
        facts["lora_rank"] = rank
        peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
        return SFTTrainer(model, peft_config=peft_config, **common), facts
    return SFTTrainer(model, **common), facts


def trainable_parameters(trainer: Any) -> int:
    """What the method trains: NeFT's selected neurons (hooks mode marks whole weights trainable), else
    every parameter with ``requires_grad``."""
    training = getattr(trainer, "neuron_training", None)
    if training is not None:
        return training.trainable_parameter_count()
    return sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


def run(args: RunArguments) -> dict[str, Any]:
    """Train (or, for ``base``, only evaluate) one method and return its result record."""
    method = parse_method(args.method)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    logger.info("%s lr=%g seed=%d: loading the model", method.name, args.learning_rate, args.seed)
    model, tokenizer = load_model(args, method)
    chat = args.chat if args.chat is not None else getattr(tokenizer, "chat_template", None) is not None
    data = pair_datasets(args, chat, seed=SPLIT_SEED)  # (train, dev, test)
    if args.max_train_pairs:
        data = (data[0].select(range(min(args.max_train_pairs, len(data[0])))), *data[1:])
    max_steps, eval_steps = schedule(args.max_steps, args.eval_steps, args.epochs, len(data[0]), args.batch_size)
    args = replace(args, max_steps=max_steps, eval_steps=eval_steps)
    regime = Regime(long=bool(args.epochs), prose_size=args.prose_size)
    timer = StepTimer()
    record: dict[str, Any] = {"method": method.name, "family": method.family, "quantized": method.quantized,
                              "mode": method.mode, "selector": method.selector, "variants": list(method.variants),
                              "learning_rate": args.learning_rate, "seed": args.seed, "max_steps": args.max_steps,
                              "batch_size": args.batch_size, "regime": regime.name, "epochs": args.epochs or None,
                              "train_pairs": len(data[0]), "dev_pairs": len(data[1]), "test_pairs": len(data[2]),
                              "torch_threads": torch.get_num_threads(), "settings": asdict(args), **regime.facts}
    with tempfile.TemporaryDirectory(prefix="neft-bench-") as output_dir:
        trainer, facts = build_trainer(args, method, model, tokenizer, data, output_dir, timer, regime)
        record.update(facts)
        logger.info("%s: eval before (%.0fs)", method.name, time.perf_counter() - started)
        record.update(regime.before(trainer, data))
        if method.family != "base":
            logger.info("%s: training %d steps (%.0fs)", method.name, args.max_steps, time.perf_counter() - started)
            train_start = time.perf_counter()
            trainer.train()
            record["train_seconds"] = time.perf_counter() - train_start
            record["peak_rss_mb"] = timer.peak_rss_mb
            record["peak_cuda_mb"] = timer.peak_cuda_mb or None
            record["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            record["step_seconds"] = timer.seconds
            record["median_step_seconds"] = timer.median()
            record["trainable_parameters"] = trainable_parameters(trainer)
            mask = getattr(trainer, "neuron_mask", None)
            record["selection_seconds"] = float(mask.metadata["selection_seconds"]) if mask is not None else 0.0
            if mask is not None:  # beside the JSON, so runs' selections can be compared (neft-trl report)
                record["mask"] = str(mask.save(Path(args.output).with_suffix(".mask.safetensors")))
            record.update(regime.after(trainer, data, record["eval_loss_before"], record.get("prose_loss_before")))
        else:
            record.update(peak_rss_mb=peak_rss_mb(), trainable_parameters=0,
                          eval_curve=[(0, record["eval_loss_before"])])
        if args.generate:
            logger.info("%s: generating (%.0fs)", method.name, time.perf_counter() - started)
            scores, hypotheses = evaluate_translations(trainer.model, tokenizer, data[2], lang=args.lang,
                                                       max_new_tokens=args.max_new_tokens,
                                                       batch_size=args.eval_batch_size, show_progress=False)
            record.update(chrf=scores.chrf, bleu=scores.bleu, samples=list(zip(data[2]["source"][:3],
                                                                               hypotheses[:3], strict=True)))
    record["total_seconds"] = time.perf_counter() - started
    logger.info("%s: done (%.0fs)", method.name, record["total_seconds"])
    return record


def write_json(record: dict[str, Any], path: str | os.PathLike) -> None:
    """Write then rename, so a killed run never leaves a result file that parses but is cut short."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(RunArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logger.setLevel(logging.INFO)
    record = run(args)
    write_json(record, args.output)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
