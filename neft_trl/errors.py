"""The errors a user can fix, as their own types, so a caller can tell a mistake in what was passed from a bug.

neft_trl raises ``UsageError`` (or a subclass) wherever it refuses a setting, a file, a model or a launch
setup, with a message that names the fix. They stay ``ValueError``s (``MissingFileError`` also a
``FileNotFoundError``, ``ArgumentsError`` also a ``TypeError``), so ``except ValueError`` keeps working. The
``neft-trl`` command prints a ``UsageError`` as one line with exit code 2; any other exception is a bug (or a
failure nobody foresaw) and keeps its traceback, exit code 1.
"""

from __future__ import annotations


class UsageError(ValueError):
    """What the user passed (a setting, a file, a model, a launch setup) cannot be used; the message names the fix."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist, or does not hold what it should."""


class ArgumentsError(UsageError, TypeError):
    """Keyword arguments a callee does not accept (e.g. ``selector_kwargs`` the selector does not take)."""
