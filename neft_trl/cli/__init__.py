"""The ``neft-trl`` command (``neft_trl.cli:main``): select neurons, train, inspect or combine masks, export, estimate.

``command.py`` builds the parser and applies the exit-code rule; each group of subcommands lives in its own
module (``run.py``, ``masks.py``, ``export.py``, ``estimate.py``).
"""

from .command import build_parser, main

__all__ = ["build_parser", "main"]
