"""Translation data for the examples: real English->X pairs, offline, in TRL's prompt-completion format.

Django ships its UI strings translated into ~100 languages as compiled gettext catalogs (``.mo``), written
by human translators. That makes an offline parallel corpus of short real sentences (~750 pairs for
German). We read those catalogs with ``gettext.GNUTranslations`` from the installed package's folder,
located by ``importlib.util.find_spec`` so Django itself is never imported or configured.

The train/held-out split is a hash of the source sentence (and a seed), not a shuffle: a pair stays on its
side when catalogs gain or lose strings, so held-out numbers from different Django versions stay comparable.
"""

from __future__ import annotations

import gettext
import hashlib
import importlib.util
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..data_sources import load_split

#: The paper's prompt (Xu et al. 2025, "Translate the following text from English to Chinese. {src}").
PROMPT_TEMPLATE = "Translate the following text from {src_lang} to {tgt_lang}. {text}"
LANGUAGE_NAMES = {"de": "German", "fr": "French", "zh_Hans": "Chinese", "zh_Hant": "Chinese (Traditional)",
                  "es": "Spanish", "it": "Italian", "ja": "Japanese", "ru": "Russian", "en": "English"}

# printf/format placeholders and HTML tags: a string that is nothing but these is not a sentence to translate.
_PLACEHOLDER = re.compile(r"%(\([^)]*\))?[-#0 +]*\d*(\.\d+)?[sdifrxX%]|\{[^{}]*\}|<[^>]+>")


@dataclass(frozen=True)
class TranslationPair:
    source: str
    target: str


def language_name(code: str) -> str:
    """``"de"`` -> ``"German"``; an unknown code is used as given (pass a name for your own data)."""
    return LANGUAGE_NAMES.get(code, code)


def django_locale_files(lang: str) -> list[Path]:
    """Every installed Django ``.mo`` catalog for ``lang`` (e.g. ``de``, ``fr``, ``zh_Hans``), sorted."""
    spec = importlib.util.find_spec("django")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The quickstart's translation pairs come from Django's catalogs: `pip install django` "
            '(or `pip install -e ".[examples]"`), or pass your own data file with --dataset.'
        )
    files = sorted(
        path
        for root in spec.submodule_search_locations
        for path in Path(root).glob(f"**/locale/{lang}/LC_MESSAGES/*.mo")
    )
    if not files:
        available = sorted({p.name for root in spec.submodule_search_locations
                            for p in (Path(root) / "conf" / "locale").iterdir() if p.is_dir() and p.name[0] != "_"})
        raise ValueError(f"Django has no catalogs for language {lang!r}. Available: {', '.join(available)}.")
    return files


def _is_translatable(text: str) -> bool:
    """False for empty strings and strings made only of placeholders, markup, digits and punctuation."""
    return any(ch.isalpha() for ch in _PLACEHOLDER.sub("", text))


def read_catalog(path: str | os.PathLike) -> list[TranslationPair]:
    """The usable pairs of one ``.mo`` catalog.

    Context entries (``"month name\\x04May"``) keep their message without the context. Plural entries keep
    the singular form (the catalog stores only the English singular as key). The header and untranslated,
    empty or placeholder-only strings are skipped.
    """
    with open(path, "rb") as handle:
        catalog = gettext.GNUTranslations(handle)._catalog  # the parsed msgid -> msgstr table; no public iterator
    pairs = []
    for key, target in catalog.items():
        if isinstance(key, tuple):  # plural: (msgid, form index)
            if key[1] != 0:
                continue
            key = key[0]
        source = key.split("\x04", 1)[-1].strip()  # drop a msgctxt
        target = target.strip()
        if source and target and _is_translatable(source) and _is_translatable(target):
            pairs.append(TranslationPair(source, target))
    return pairs


def django_pairs(lang: str = "de", max_chars: int | None = None) -> list[TranslationPair]:
    """English -> ``lang`` pairs from every installed Django catalog, deduplicated by source text.

    ``max_chars`` drops pairs whose source or target is longer (keeps sequences short for CPU runs). Where a
    source has several translations (different catalogs or contexts), the first in sorted file order wins.
    """
    seen: dict[str, str] = {}
    for path in django_locale_files(lang):
        for pair in read_catalog(path):
            if max_chars is not None and max(len(pair.source), len(pair.target)) > max_chars:
                continue
            seen.setdefault(pair.source, pair.target)
    return [TranslationPair(s, t) for s, t in sorted(seen.items())]


def _split_key(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def split_pairs(
    pairs: Sequence[Any], test_size: int | float = 0.15, seed: int = 0, key: Any = None
) -> tuple[list[Any], list[Any]]:
    """``(train, test)``: the ``test_size`` items (a count, or a share if < 1) with the smallest seeded hash.

    Deterministic and stable: the same item lands on the same side in every run and whatever else the
    list holds. ``key(item) -> str`` names what is hashed (default: ``item.source``, else ``str(item)``).
    """
    if isinstance(test_size, float) and not 0 < test_size < 1:
        raise ValueError(f"test_size={test_size} as a share must be in (0, 1); pass an int for a count.")
    count = round(len(pairs) * test_size) if isinstance(test_size, float) else int(test_size)
    if not 0 < count < len(pairs):
        raise ValueError(f"test_size={test_size} leaves no train or no test items out of {len(pairs)}.")
    key = key or (lambda item: getattr(item, "source", None) or str(item))
    order = sorted(range(len(pairs)), key=lambda i: _split_key(key(pairs[i]), seed))
    test_ids = set(order[:count])
    train = [p for i, p in enumerate(pairs) if i not in test_ids]
    test = [p for i, p in enumerate(pairs) if i in test_ids]
    return train, test


def translation_prompt(text: str, tgt_lang: str, src_lang: str = "English") -> str:
    return PROMPT_TEMPLATE.format(src_lang=language_name(src_lang), tgt_lang=language_name(tgt_lang), text=text)


def to_prompt_completion(
    pairs: Iterable[TranslationPair], tgt_lang: str, src_lang: str = "English", conversational: bool = True
) -> Dataset:
    """A ``datasets.Dataset`` in TRL's prompt-completion format (loss on the completion only, as the paper).

    ``conversational=True`` gives chat messages (TRL applies the tokenizer's chat template, which suits
    instruct models); ``False`` gives plain text with the prompt ending in a newline, for base models or
    tokenizers without a chat template. ``source``/``target`` columns are kept for evaluation.
    """
    rows: dict[str, list[Any]] = {"prompt": [], "completion": [], "source": [], "target": []}
    for pair in pairs:
        prompt = translation_prompt(pair.source, tgt_lang, src_lang)
        if conversational:
            rows["prompt"].append([{"role": "user", "content": prompt}])
            rows["completion"].append([{"role": "assistant", "content": pair.target}])
        else:
            rows["prompt"].append(prompt + "\n")
            rows["completion"].append(pair.target)
        rows["source"].append(pair.source)
        rows["target"].append(pair.target)
    if not rows["prompt"]:
        raise ValueError("No translation pairs to build a dataset from.")
    return Dataset.from_dict(rows)


def load_pairs_file(
    path: str | os.PathLike, source_column: str = "source", target_column: str = "target", split: str | None = None
) -> list[TranslationPair]:
    """Pairs from any data ``datasets`` loads: a .json/.jsonl/.csv/.parquet file, a saved dataset folder or a
    hub dataset name (through ``neft_trl.data_sources.load_split``)."""
    dataset = load_split(str(path), None, split)
    missing = [c for c in (source_column, target_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{str(path)!r} has no column(s) {missing}; its columns are {dataset.column_names}. Set "
            "--source_column/--target_column (or source_column=/target_column=) to the right names."
        )
    pairs = [TranslationPair(str(s).strip(), str(t).strip())
             for s, t in zip(dataset[source_column], dataset[target_column], strict=True)
             if s is not None and t is not None and str(s).strip() and str(t).strip()]
    if not pairs:
        raise ValueError(f"{str(path)!r} holds no non-empty ({source_column}, {target_column}) pairs.")
    return pairs
