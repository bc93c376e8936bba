"""The translation-pair data flags of the examples and benchmarks, and the one function that turns them into data.

``examples/quickstart.py``, ``examples/sft_neft.py`` (without ``--dataset_name``) and
``benchmarks/run_method.py`` all train on English->X pairs: Django's catalogs or a pairs file, split by the
seeded hash of ``split_pairs`` so that the same pair is held out in every run. They parse these flags with
``HfArgumentParser`` next to their own and call ``pair_datasets``, so the data and its split cannot drift
between a quickstart, a benchmark and the SFT script.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset

from .data import TranslationPair, django_pairs, language_name, load_pairs_file, split_pairs, to_prompt_completion


@dataclass
class PairDataArguments:
    """Which translation pairs, and how many are held out (``dev_size`` > 0: a dev split from the train side)."""

    dataset: str | None = field(
        default=None,
        metadata={"help": "A .json/.jsonl/.csv/.parquet file (or saved/hub dataset) of translation pairs. Default: "
                          "English->--lang pairs from the installed Django translation catalogs."},
    )
    source_column: str = field(default="source", metadata={"help": "Source-text column of --dataset."})
    target_column: str = field(default="target", metadata={"help": "Target-text column of --dataset."})
    lang: str = field(
        default="de",
        metadata={"help": "Target language: a Django locale code (de, fr, zh_Hans, ...) or, with --dataset, the "
                          "language's name as it should read in the prompt."},
    )
    max_chars: int = field(default=60, metadata={"help": "Drop Django pairs longer than this (keeps CPU runs short)."})
    test_size: int = field(default=120, metadata={"help": "Held-out test pairs (eval loss, chrF, BLEU)."})
    dev_size: int = field(default=0, metadata={"help": "Dev pairs taken from the train side (0: no dev split)."})


def load_pairs(args: PairDataArguments) -> list[TranslationPair]:
    """The pairs of ``--dataset``, or Django's catalog pairs for ``--lang`` of at most ``--max_chars``."""
    if args.dataset:
        return load_pairs_file(args.dataset, args.source_column, args.target_column)
    return django_pairs(args.lang, max_chars=args.max_chars)


def pair_datasets(args: PairDataArguments, chat: bool, seed: int = 0) -> tuple[Dataset, ...]:
    """``(train, test)``, or ``(train, dev, test)`` with ``dev_size``: prompt-completion datasets (``source`` and
    ``target`` columns kept), split by ``split_pairs``' seeded hash (``seed`` picks the held-out pairs)."""
    train, test = split_pairs(load_pairs(args), args.test_size, seed=seed)
    parts = [train, test]
    if args.dev_size:
        train, dev = split_pairs(train, args.dev_size, seed=seed)
        parts = [train, dev, test]
    target = language_name(args.lang)
    return tuple(to_prompt_completion(p, target, conversational=chat) for p in parts)
