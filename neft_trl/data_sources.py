"""Where training data comes from: one split of a local file, a saved dataset folder, or a ``datasets`` name.

The one data-source loader of the package: the CLI, ``examples/`` and the demo helpers all read data through
``load_split``, so a file type or a split is understood the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UsageError

#: ``datasets`` builders for local data files, by suffix.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DataSourceError(UsageError):
    """A data source that cannot be read as asked; the message names the fix."""


def load_split(source: str, config: str | None, split: str | None) -> Any:
    """One split of a local file, a saved dataset folder, or a ``datasets`` name.

    A file or a saved single ``Dataset`` has one split, which ``datasets`` names ``train``; ``split=None``
    asks for that one split and fails on sources with several, naming them.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(source)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataSourceError(f"{source!r}: unknown data file type; use one of {', '.join(FILE_BUILDERS)}.")
        data = load_dataset(builder, data_files=str(path), split="train")
    elif path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
        data = load_from_disk(str(path))
    elif path.suffix.lower() in FILE_BUILDERS or source.startswith((".", "/", "~")):
        raise DataSourceError(f"No such data file or folder: {source!r}.")
    else:
        data = load_dataset(source, config) if split is None else load_dataset(source, config, split=split)
    if isinstance(data, Dataset):
        if split not in (None, "train"):
            raise DataSourceError(f"{source!r} holds one split only, not {split!r}: pass evaluation data as "
                           "--eval_dataset_name FILE.")
        return data
    if not isinstance(data, DatasetDict):
        raise DataSourceError(f"{source!r} is a {type(data).__name__}, not a dataset with rows.")
    if split is None and len(data) == 1:
        split = next(iter(data))
    if split not in data:
        raise DataSourceError(f"{source!r} has splits {list(data)}; choose one with --dataset_train_split / "
                       "--dataset_test_split.")
    return data[split]
