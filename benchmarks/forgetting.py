"""The forgetting probe: the loss on general English prose that is not translation, before and after training.

A method that gains in-domain by forgetting more of what the model knew is not better. The probe text must be
offline, plain English and permissively licensed: the Python documentation's prose that ships with CPython
itself as ``pydoc_data.topics`` (the language reference topics behind ``help("assert")`` etc., PSF license).
From it we keep prose paragraphs only (no code blocks, grammar rules or tables, 200-800 characters) and draw
a fixed, seeded selection. The text depends on the Python version, so every run records the version and a
hash of the exact paragraphs: only runs with the same hash are compared.
"""

from __future__ import annotations

import hashlib
import random
import re
import sys

from datasets import Dataset

PROSE_SEED = 0
_MIN_CHARS, _MAX_CHARS = 200, 800
_WORDS = re.compile(r"[A-Za-z]+")


def _is_prose(paragraph: str) -> bool:
    """A paragraph of running text: not indented (code), not a grammar rule or table, mostly words, a sentence."""
    lines = paragraph.splitlines()
    if any(line.startswith((" ", "\t")) for line in lines) or "::=" in paragraph or "|" in paragraph:
        return False
    text = " ".join(line.strip() for line in lines)
    if not (_MIN_CHARS <= len(text) <= _MAX_CHARS) or not text[0].isupper() or not text.endswith("."):
        return False
    letters = sum(len(w) for w in _WORDS.findall(text))
    return letters >= 0.75 * len(text.replace(" ", ""))


def prose_paragraphs(count: int, seed: int = PROSE_SEED) -> list[str]:
    """``count`` prose paragraphs of ``pydoc_data.topics``, the same ones for the same seed and Python version."""
    from pydoc_data.topics import topics

    pool = sorted({" ".join(line.strip() for line in p.splitlines())
                   for key in sorted(topics) for p in topics[key].split("\n\n") if _is_prose(p)})
    if count < 1 or count > len(pool):
        raise ValueError(f"--prose_size must be between 1 and {len(pool)} (the prose paragraphs of this Python's "
                         f"pydoc_data), got {count}.")
    return random.Random(seed).sample(pool, count)


def prose_dataset(count: int) -> tuple[Dataset, dict[str, str]]:
    """The probe as a plain-text dataset (language-modelling loss on every token) and facts for the record."""
    paragraphs = prose_paragraphs(count)
    digest = hashlib.sha256("\n".join(paragraphs).encode()).hexdigest()[:16]
    facts = {"prose_source": "pydoc_data.topics (Python documentation, PSF license)",
             "prose_python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
             "prose_sha256": digest, "prose_paragraphs": str(count)}
    return Dataset.from_dict({"text": paragraphs}), facts
