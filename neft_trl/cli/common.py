"""What every ``neft-trl`` subcommand shares: the user-error type, one-line messages, mask files and plots."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..mask import NeuronMask

#: What loading a model, tokenizer or data raises for a user's mistake besides neft_trl's own ``UsageError``:
#: a path or hub id that does not exist or cannot be read (``OSError``), an optional package the flags need
#: but that is not installed, e.g. bitsandbytes for --load_in_4bit (``ImportError``).
LOADING_ERRORS = (UsageError, OSError, ImportError)


class CLIError(UsageError):
    """A user mistake found by the command line itself: printed as one line, exit code 2."""


def one_line(err: BaseException) -> str:
    """An exception's message on one line (the CLI prints user errors as a single line)."""
    return " ".join(str(err).split()) or type(err).__name__


def load_mask(source: str) -> NeuronMask:
    try:
        return NeuronMask.load(source)
    except (UsageError, OSError) as err:
        raise CLIError(f"Cannot read neuron mask {source!r}: {one_line(err)}") from err


def save_mask(mask: NeuronMask, out: str) -> Path:
    try:
        return mask.save(out)
    except OSError as err:
        raise CLIError(f"Cannot write {out!r}: {one_line(err)}") from err


def write_plots(mask: NeuronMask, folder: Path, label: str) -> list[Path]:
    """A heatmap and a per-layer bar chart of ``mask`` in ``folder``; matplotlib missing is a user error."""
    try:
        from ..plots import plot_heatmap, plot_layer_counts
    except ImportError as err:
        raise CLIError(f"Plots need matplotlib ({err}): pip install 'neft-trl[plots]'.") from err
    return [plot_heatmap(mask, folder / f"{label}_heatmap.png"),
            plot_layer_counts(mask, folder / f"{label}_layers.png")]
