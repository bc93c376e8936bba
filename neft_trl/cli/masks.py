"""``neft-trl report`` and ``neft-trl plots``: read saved mask files only, no model."""

from __future__ import annotations

import argparse
import json
import sys
from functools import reduce
from pathlib import Path

from ..errors import UsageError
from ..mask import MASK_FILENAME, NeuronMask
from ..report import neuron_report
from .common import CLIError, load_mask, one_line, save_mask, write_plots


def add_report_arguments(report: argparse.ArgumentParser) -> None:
    report.add_argument("masks", nargs="+", metavar="MASK", help=f"{MASK_FILENAME} files or folders holding one.")
    report.add_argument("--json", action="store_true", help="Print the numbers as JSON instead of tables.")
    report.add_argument("--union", metavar="OUT", help="Write the union of all masks to OUT.")
    report.add_argument("--intersection", metavar="OUT", help="Write the intersection of all masks to OUT.")


def add_plots_arguments(plots: argparse.ArgumentParser) -> None:
    plots.add_argument("masks", nargs="+", metavar="MASK", help=f"{MASK_FILENAME} files or folders holding one.")
    plots.add_argument("--out", required=True, metavar="DIR", help="Folder for the PNG files.")


def report_command(args: argparse.Namespace) -> None:
    masks = [load_mask(p) for p in args.masks]
    try:
        report = neuron_report(masks[0], masks[1:], names=args.masks)
    except UsageError as err:
        raise CLIError(f"{args.masks[0]!r} and the other masks do not match: {one_line(err)}") from err
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown())
    for out, op, word in ((args.union, NeuronMask.__or__, "union"), (args.intersection, NeuronMask.__and__,
                                                                      "intersection")):
        if out:
            combined = reduce(op, masks)
            combined.metadata.update({"budget": f"{word} of {len(masks)} masks",
                                      "combined_from": json.dumps(args.masks)})
            print(f"{word.capitalize()} ({combined.num_selected:,} neurons): {save_mask(combined, out)}",
                  file=sys.stderr if args.json else sys.stdout)


def plots_command(args: argparse.Namespace) -> None:
    labels = [_label(p) for p in args.masks]
    for i, (source, label) in enumerate(zip(args.masks, labels, strict=True)):
        label = label if labels.count(label) == 1 else f"{label}_{i}"
        for png in write_plots(load_mask(source), Path(args.out), label):
            print(f"Plot: {png}")


def _label(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return path.resolve().name
    return path.resolve().parent.name if path.name == MASK_FILENAME else path.stem
