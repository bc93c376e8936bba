"""The usual TRL SFT script, with NeFT: train only the selected MLP neurons of any causal LM.

    python examples/sft_neft.py --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \\
        --dataset_name trl-lib/Capybara --output_dir smollm2-neft --param_ratio 0.06 --selector cosine
    python examples/sft_neft.py --model_name_or_path ./my-local-model --dataset_name data.jsonl --max_steps 100

Every ``NeFTConfig`` field (TRL's ``SFTConfig`` plus selector, budget, mode) is a flag. Without
``--dataset_name`` it trains on English->German pairs from Django's installed catalogs; without
``--model_name_or_path`` on SmolLM2-135M-Instruct converted offline (see ``neft_trl.demo.models``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser

from neft_trl import NeFTConfig, NeFTSFTTrainer
from neft_trl.data_sources import load_split
from neft_trl.demo.arguments import PairDataArguments, pair_datasets
from neft_trl.demo.models import resolve_model

#: Held-out Django pairs without --dataset_name: a tenth of the 725 German pairs of at most 80 characters.
DJANGO_HELD_OUT = 72


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id, local folder or .gguf file (default: offline SmolLM2-135M-Instruct)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name, .json/.jsonl/.csv/.parquet file or saved dataset folder, in any format "
                          "SFTTrainer takes (text, prompt-completion, messages). Default: Django English->German."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on (optional)."})


def load_data(script_args: ScriptArguments) -> tuple[Any, Any]:
    """``(train, eval or None)`` from ``--dataset_name``, or the offline Django pairs (English->German of at most
    80 characters, ``DJANGO_HELD_OUT`` held out by ``split_pairs``' seeded hash, as in the quickstart and
    benchmarks)."""
    if script_args.dataset_name is None:
        return pair_datasets(PairDataArguments(lang="de", max_chars=80, test_size=DJANGO_HELD_OUT), chat=False)
    train = load_split(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    test = None
    if script_args.dataset_test_split is not None:
        test = load_split(script_args.dataset_name, script_args.dataset_config, script_args.dataset_test_split)
    return train, test


def main(argv: list[str] | None = None) -> NeFTSFTTrainer:
    parser = HfArgumentParser((ScriptArguments, NeFTConfig))
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    train_dataset, eval_dataset = load_data(script_args)
    trainer = NeFTSFTTrainer(
        model=resolve_model(script_args.model_name_or_path),  # a path: loaded as SFTTrainer would
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        args=training_args,
    )
    trainer.train()
    if eval_dataset is not None:
        print(trainer.evaluate())
    trainer.save_model(training_args.output_dir)
    print(f"{trainer.neuron_mask} -> {training_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
