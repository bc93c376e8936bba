"""The ``neft-trl`` command line: one parser, one module per group of subcommands, one exit-code rule.

``select``/``train`` (``run.py``), ``report``/``plots`` (``masks.py``, mask files only), ``export`` and
``estimate`` (their own modules) each add their flags here. A user mistake (bad flag value, missing
or unreadable file, masks of different models: a ``neft_trl.errors.UsageError``) ends with exit code 2 and one
line naming the fix, the argparse convention. Any other exception is a bug or an unforeseen failure: it keeps
its traceback and exits 1, so it is never disguised as a user mistake.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from transformers import HfArgumentParser

from ..config import NeFTConfig
from ..errors import UsageError
from . import estimate, export, masks
from .common import CLIError, one_line
from .run import RunArguments, SelectArguments, select_command, train_command


def _dataclasses(ns: argparse.Namespace, types: Sequence[type]) -> list[Any]:
    """Build the dataclasses from the parsed flags, as ``HfArgumentParser.parse_args_into_dataclasses`` does."""
    values = vars(ns)
    objects = []
    for dtype in types:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:  # validation of the flags' values only: NeFTConfig's and TrainingArguments' checks raise ValueError
            objects.append(dtype(**{k: v for k, v in values.items() if k in names}))
        except ValueError as err:
            raise CLIError(one_line(err)) from err
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
        [RunArguments, SelectArguments, NeFTConfig], select_command)
    add("train", "Fine-tune the selected neurons (like `trl sft`), then save the model and its mask.",
        [RunArguments, NeFTConfig], train_command)
    masks.add_report_arguments(add("report", "Per-layer counts of masks, their overlap and Jaccard; "
                                   "union/intersection.", [], masks.report_command))
    masks.add_plots_arguments(add("plots", "Write a heatmap and a per-layer bar chart (PNG) for each mask.", [],
                                  masks.plots_command))
    export.add_arguments(add("export", "Write a NeFT run as a PEFT LoRA adapter folder (for PEFT, vLLM, ...).", [],
                             export.export_command))
    estimate.add_arguments(add("estimate", "Estimate NeFT's memory (selection and training) against LoRA at equal "
                               "parameters, from the model's config alone (no weights loaded).", [],
                               estimate.estimate_command))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: 0 on success, 2 with one line on a ``UsageError``; any other exception propagates."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UsageError as err:  # raised while setting up, selecting or training: the message names the fix
        print(f"neft-trl {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0
