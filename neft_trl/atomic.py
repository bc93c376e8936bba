"""Atomic file writes: every file neft_trl writes goes through here.

A save killed half-way (kill -9, a full disk) must never leave a file that loads wrong: write to a temp
file beside the target, then rename over it (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
