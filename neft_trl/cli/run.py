"""``neft-trl select`` and ``neft-trl train``: load a model and data as ``trl sft`` does, then select or train.

Both parse ``HfArgumentParser(RunArguments, NeFTConfig)``, so every ``NeFTConfig`` (and
``SFTConfig``/``TrainingArguments``) field is a flag with its own help text; nothing is re-declared here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import NeFTConfig
from ..data_sources import load_split
from ..mask import MASK_FILENAME, NeuronMask
from .common import LOADING_ERRORS, CLIError, one_line, write_plots


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

    from ..trainer import NeFTSFTTrainer

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
        raise CLIError(one_line(err)) from err
    return trainer


def select_command(run: RunArguments, selection: SelectArguments, config: NeFTConfig) -> None:
    trainer = build_trainer(run, config)
    trainer.neuron_mask = trainer.select_neurons()
    path = trainer.neuron_mask.save(selection.mask_out or Path(config.output_dir) / MASK_FILENAME)
    _finish(trainer, path, run.plot)


def train_command(run: RunArguments, config: NeFTConfig) -> None:
    trainer = build_trainer(run, config)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    _finish(trainer, Path(config.output_dir) / MASK_FILENAME, run.plot)


def _finish(trainer: Any, mask_path: Path, plot: bool) -> None:
    print(trainer.neuron_report(names=[str(mask_path)]).to_markdown())
    print(f"Neuron mask: {mask_path}")
    if plot:
        for png in write_plots(trainer.neuron_mask, mask_path.parent, mask_path.stem):
            print(f"Plot: {png}")
