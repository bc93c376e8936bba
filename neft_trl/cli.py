"""The ``neft-trl`` command: select neurons, train, and inspect or combine saved neuron masks.

``select`` and ``train`` parse ``HfArgumentParser(RunArguments, NeFTConfig)``, so every ``NeFTConfig`` (and
``SFTConfig``/``TrainingArguments``) field is a flag with its own help text; nothing is re-declared here.
``report`` and ``plots`` only read mask files: they need no model. A user mistake (bad flag value, missing
or unreadable file, masks of different models: a ``neft_trl.errors.UsageError``) ends with exit code 2 and one
line naming the fix, the argparse convention. Any other exception is a bug or an unforeseen failure: it keeps
its traceback and exits 1, so it is never disguised as a user mistake.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from .config import NeFTConfig
from .data_sources import load_split
from .errors import UsageError
from .mask import MASK_FILENAME, NeuronMask
from .report import neuron_report

#: What loading a model, tokenizer or data raises for a user's mistake besides neft_trl's own ``UsageError``:
#: a path or hub id that does not exist or cannot be read (``OSError``), an optional package the flags need
#: but that is not installed, e.g. bitsandbytes for --load_in_4bit (``ImportError``).
LOADING_ERRORS = (UsageError, OSError, ImportError)


class CLIError(UsageError):
    """A user mistake found by the command line itself: printed as one line, exit code 2."""


@dataclass
class RunArguments:
    """What to load for ``select``/``train``: the model, the data, and optional extras."""

    model_name_or_path: str = field(metadata={"help": "Model folder or hub id (loaded as SFTTrainer does)."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: a .json/.jsonl/.csv/.parquet/.txt file, a folder saved with "
                          "Dataset.save_to_disk, or a `datasets` name. Columns as SFTTrainer expects (text, "
                          "messages, or prompt/completion). Required by select too: the trainer (as TRL's "
                          "SFTTrainer) needs training data even for a data-free selector."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a `datasets` name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on / select from."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split of the evaluation data (of --eval_dataset_name, or of --dataset_name)."}
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Evaluation data from another file, saved folder or name."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or id (default: the model's own)."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the model 4-bit (bitsandbytes); trains deltas."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the model 8-bit (bitsandbytes); trains deltas."})
    plot: bool = field(default=False, metadata={"help": "Also write PNG plots of the selection next to the mask."})


@dataclass
class SelectArguments:
    mask_out: str | None = field(
        default=None, metadata={"help": f"Where to write the mask (default: OUTPUT_DIR/{MASK_FILENAME})."}
    )


def build_trainer(run: RunArguments, config: NeFTConfig) -> Any:
    """``NeFTSFTTrainer`` for the parsed flags; a model, tokenizer or data that cannot be loaded is a ``CLIError``."""
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from .trainer import NeFTSFTTrainer

    if run.dataset_name is None:  # found here, not as TRL's bare "`train_dataset` is required"
        raise CLIError("--dataset_name is required: a data file, a saved dataset folder or a `datasets` name.")
    if run.load_in_4bit and run.load_in_8bit:
        raise CLIError("Set only one of --load_in_4bit and --load_in_8bit.")
    kwargs: dict[str, Any] = {}
    try:
        kwargs["train_dataset"] = load_split(run.dataset_name, run.dataset_config, run.dataset_train_split)
        if run.eval_dataset_name or run.dataset_test_split:
            source = run.eval_dataset_name or run.dataset_name
            kwargs["eval_dataset"] = load_split(source, run.dataset_config, run.dataset_test_split)
        if run.tokenizer_name_or_path:
            kwargs["processing_class"] = AutoTokenizer.from_pretrained(run.tokenizer_name_or_path)
        if run.load_in_4bit or run.load_in_8bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=run.load_in_4bit,
                                                               load_in_8bit=run.load_in_8bit)
        trainer = NeFTSFTTrainer(run.model_name_or_path, args=config, **kwargs)
        if config.neuron_mask_path:  # fail now, not after the model is wired for training
            NeuronMask.load(config.neuron_mask_path).check_fits(trainer.neuron_map)
    except CLIError:
        raise
    except LOADING_ERRORS as err:
        raise CLIError(_one_line(err)) from err
    return trainer


# -- commands -------------------------------------------------------------------------------------------
def _select(run: RunArguments, selection: SelectArguments, config: NeFTConfig) -> None:
    trainer = build_trainer(run, config)
    trainer.neuron_mask = trainer.select_neurons()
    path = trainer.neuron_mask.save(selection.mask_out or Path(config.output_dir) / MASK_FILENAME)
    _finish(trainer, path, run.plot)


def _train(run: RunArguments, config: NeFTConfig) -> None:
    trainer = build_trainer(run, config)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    _finish(trainer, Path(config.output_dir) / MASK_FILENAME, run.plot)


def _finish(trainer: Any, mask_path: Path, plot: bool) -> None:
    print(trainer.neuron_report(names=[str(mask_path)]).to_markdown())
    print(f"Neuron mask: {mask_path}")
    if plot:
        for png in _write_plots(trainer.neuron_mask, mask_path.parent, mask_path.stem):
            print(f"Plot: {png}")


def _report(args: argparse.Namespace) -> None:
    masks = [_load_mask(p) for p in args.masks]
    try:
        report = neuron_report(masks[0], masks[1:], names=args.masks)
    except UsageError as err:
        raise CLIError(f"{args.masks[0]!r} and the other masks do not match: {_one_line(err)}") from err
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown())
    for out, op, word in ((args.union, NeuronMask.__or__, "union"), (args.intersection, NeuronMask.__and__,
                                                                      "intersection")):
        if out:
            combined = reduce(op, masks)
            combined.metadata.update({"budget": f"{word} of {len(masks)} masks",
                                      "combined_from": json.dumps(args.masks)})
            print(f"{word.capitalize()} ({combined.num_selected:,} neurons): {_save_mask(combined, out)}",
                  file=sys.stderr if args.json else sys.stdout)


def _plots(args: argparse.Namespace) -> None:
    labels = [_label(p) for p in args.masks]
    for i, (source, label) in enumerate(zip(args.masks, labels, strict=True)):
        label = label if labels.count(label) == 1 else f"{label}_{i}"
        for png in _write_plots(_load_mask(source), Path(args.out), label):
            print(f"Plot: {png}")


def _export(args: argparse.Namespace) -> None:
    from .training.delta_io import DELTA_FILENAME
    from .training.peft_export import ADAPTER_FILENAME, export_peft_adapter

    try:
        out = export_peft_adapter(args.run_dir, args.out, args.base_model, uniform_rank=args.uniform_rank)
    except (*LOADING_ERRORS, ValueError) as err:  # a bad folder or model: the files are the input here
        raise CLIError(_one_line(err)) from err
    line = f"PEFT LoRA adapter: {out} ({(out / ADAPTER_FILENAME).stat().st_size:,} bytes"
    delta = Path(args.run_dir) / DELTA_FILENAME
    print(line + (f"; the run's {DELTA_FILENAME}: {delta.stat().st_size:,} bytes)" if delta.is_file() else ")"))


def _estimate(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .budget import Budget
    from .estimate import activation_bytes, estimate_lora, estimate_neft, format_table
    from .neurons import build_neuron_map

    try:
        config = AutoConfig.from_pretrained(args.model)
        budget = Budget.resolve(args.param_ratio, args.neuron_ratio, args.num_neurons)
        with torch.device("meta"):  # shapes only: no weight is allocated or read
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
        neuron_map = build_neuron_map(model, include_gate=args.include_gate, targets=args.neuron_targets)
        mode = "delta" if args.neft_mode == "auto" else args.neft_mode
        neft = estimate_neft(model, neuron_map, budget, args.selector, mode, args.probe)
    except (*LOADING_ERRORS, ValueError) as err:  # a bad folder or model: the files are the input here
        raise CLIError(_one_line(err)) from err
    lora = estimate_lora(model, neft.trainable_parameters)
    print(f"{args.model}: {args.selector} selector ({args.probe} probe), neft_mode={mode}, {args.dtype}, {budget}")
    print(format_table(neft, lora, activation_bytes(model, args.tokens, torch.finfo(getattr(torch, args.dtype)).bits
                                                    // 8)))


# -- helpers -------------------------------------------------------------------------------------------
def _write_plots(mask: NeuronMask, folder: Path, label: str) -> list[Path]:
    try:
        from .plots import plot_heatmap, plot_layer_counts
    except ImportError as err:
        raise CLIError(f"Plots need matplotlib ({err}): pip install 'neft-trl[plots]'.") from err
    return [plot_heatmap(mask, folder / f"{label}_heatmap.png"),
            plot_layer_counts(mask, folder / f"{label}_layers.png")]


def _label(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return path.resolve().name
    return path.resolve().parent.name if path.name == MASK_FILENAME else path.stem


def _load_mask(source: str) -> NeuronMask:
    try:
        return NeuronMask.load(source)
    except (UsageError, OSError) as err:
        raise CLIError(f"Cannot read neuron mask {source!r}: {_one_line(err)}") from err


def _save_mask(mask: NeuronMask, out: str) -> Path:
    try:
        return mask.save(out)
    except OSError as err:
        raise CLIError(f"Cannot write {out!r}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _dataclasses(ns: argparse.Namespace, types: Sequence[type]) -> list[Any]:
    """Build the dataclasses from the parsed flags, as ``HfArgumentParser.parse_args_into_dataclasses`` does."""
    values = vars(ns)
    objects = []
    for dtype in types:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:  # validation of the flags' values only: NeFTConfig's and TrainingArguments' checks raise ValueError
            objects.append(dtype(**{k: v for k, v in values.items() if k in names}))
        except ValueError as err:
            raise CLIError(_one_line(err)) from err
    return objects


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neft-trl", description="Neuron-Level Fine-Tuning (NeFT) for TRL: select, train, report, plot.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)

    def add(name: str, help: str, types: list[type], run: Callable[..., None]) -> HfArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, dataclass_types=types)
        for action in sub._actions:  # argparse %-formats help text: a field's "6%" would crash --help
            if action.help and action.help is not argparse.SUPPRESS:
                action.help = action.help.replace("%", "%%")
        sub.set_defaults(run=lambda ns: run(*_dataclasses(ns, types)) if types else run(ns))
        return sub

    add("select", "Select neurons with a selector and write the mask; no training.",
        [RunArguments, SelectArguments, NeFTConfig], _select)
    add("train", "Fine-tune the selected neurons (like `trl sft`), then save the model and its mask.",
        [RunArguments, NeFTConfig], _train)
    report = add("report", "Per-layer counts of masks, their overlap and Jaccard; union/intersection.", [], _report)
    report.add_argument("masks", nargs="+", metavar="MASK", help=f"{MASK_FILENAME} files or folders holding one.")
    report.add_argument("--json", action="store_true", help="Print the numbers as JSON instead of tables.")
    report.add_argument("--union", metavar="OUT", help="Write the union of all masks to OUT.")
    report.add_argument("--intersection", metavar="OUT", help="Write the intersection of all masks to OUT.")
    plots = add("plots", "Write a heatmap and a per-layer bar chart (PNG) for each mask.", [], _plots)
    plots.add_argument("masks", nargs="+", metavar="MASK", help=f"{MASK_FILENAME} files or folders holding one.")
    plots.add_argument("--out", required=True, metavar="DIR", help="Folder for the PNG files.")
    export = add("export", "Write a NeFT run as a PEFT LoRA adapter folder (for PEFT, vLLM, ...).", [], _export)
    export.add_argument("run_dir", metavar="RUN_DIR", help="Output folder of a NeFT run (delta or hooks mode).")
    export.add_argument("out", metavar="OUT", help="Folder for adapter_config.json + adapter_model.safetensors.")
    export.add_argument("--format", choices=("peft",), default="peft", help="Adapter format (default: peft).")
    export.add_argument("--base_model", metavar="PATH", default=None,
                        help="The model the run started from: required for a hooks run (adapter = trained - base); "
                             "for a delta run it is checked against the deltas.")
    export.add_argument("--uniform_rank", action="store_true",
                        help="Pad every module to the largest rank instead of per-module ranks (rank_pattern), "
                             "for engines that read only the global r (llama.cpp, TGI).")
    estimate = add("estimate", "Estimate NeFT's memory (selection and training) against LoRA at equal parameters, "
                   "from the model's config alone (no weights loaded).", [], _estimate)
    estimate.add_argument("model", metavar="MODEL", help="Model folder (or hub id, online) holding config.json.")
    budget = estimate.add_mutually_exclusive_group()
    budget.add_argument("--param_ratio", type=float, default=None, help="Share of all parameters (default 0.06).")
    budget.add_argument("--neuron_ratio", type=float, default=None, help="Share of the candidate neurons.")
    budget.add_argument("--num_neurons", type=int, default=None, help="Number of candidate neurons.")
    estimate.add_argument("--selector", default="cosine", help="cosine, activation, gradient, random, ...")
    estimate.add_argument("--probe", choices=("sketch", "full"), default="sketch", help="The cosine probe.")
    estimate.add_argument("--neft_mode", choices=("auto", "hooks", "delta"), default="auto")
    estimate.add_argument("--include_gate", action="store_true", help="gate_proj rows are candidates too.")
    estimate.add_argument("--neuron_targets", default="mlp",
                          help="Candidates: 'mlp' (default) or 'mlp,attention' (q/k/v rows and o columns too).")
    estimate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    estimate.add_argument("--tokens", type=int, default=2048, help="Tokens per batch for the activation figure.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: 0 on success, 2 with one line on a ``UsageError``; any other exception propagates."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UsageError as err:  # raised while setting up, selecting or training: the message names the fix
        print(f"neft-trl {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
