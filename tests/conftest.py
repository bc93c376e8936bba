"""Shared fixtures: tiny randomly initialised models of several architectures, a real word-level tokenizer
built offline, and a small text dataset. Nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

WORDS = ("the a cat dog sat ran on under mat log red blue big small house tree sun moon and then "
         "translate hello world good day night to from is was").split()
SPECIALS = ["<pad>", "<unk>", "<eos>"]
VOCAB_SIZE = 64


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def _common(**kw):
    return dict(vocab_size=VOCAB_SIZE, pad_token_id=0, eos_token_id=2, bos_token_id=2, **kw)


CONFIGS = {
    "llama": lambda: LlamaConfig(**_common(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=128, tie_word_embeddings=False)),
    "qwen2": lambda: Qwen2Config(**_common(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=128)),
    "gpt2": lambda: GPT2Config(**_common(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=128)),
    "gpt_neox": lambda: GPTNeoXConfig(**_common(hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=128)),
    "phi": lambda: PhiConfig(**_common(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=128)),
}
ARCHITECTURES = ["llama", "qwen2", "gpt2", "gpt_neox"]


def make_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).float()


def make_token_batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` collated causal-LM batches of random token ids (2 x 9, labels = inputs) for the functional API."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (2, 9), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def make_dataset(n: int = 32, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        idx = torch.randint(len(WORDS), (int(torch.randint(4, 10, (1,), generator=g)),), generator=g)
        rows.append(" ".join(WORDS[i] for i in idx))
    return Dataset.from_dict({"text": rows})


def torchrun(script: Path, out: Path, *script_args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run ``script --output_dir out *script_args`` as ``nproc`` processes under ``torchrun`` (one thread each).

    The ranks import the same ``neft_trl`` as this process (a checkout under test, not an installed copy).
    """
    import neft_trl

    source = str(Path(neft_trl.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script), "--output_dir", str(out), *script_args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def rank_results(out: Path, rank: int) -> dict:
    """What a torchrun test script wrote for ``rank``: its JSON facts, saved tensors (``params``), neuron mask and,
    where it wrote them, selector scores (``scores``, else None)."""
    import json

    from safetensors.torch import load_file

    from neft_trl import NeuronMask

    prefix = out / f"rank{rank}"
    result = json.loads(prefix.with_suffix(".json").read_text())
    result["params"] = load_file(prefix.with_suffix(".safetensors"))
    result["mask"] = NeuronMask.load(f"{prefix}_mask.safetensors")
    scores = Path(f"{prefix}_scores.safetensors")
    result["scores"] = load_file(scores) if scores.exists() else None
    return result


@pytest.fixture(autouse=True)
def _accelerate_env_per_test():
    """Each test starts with the process's ``ACCELERATE_*`` variables as they were before it.

    transformers 4.x ``TrainingArguments.__post_init__`` writes ``ACCELERATE_MIXED_PRECISION=bf16`` (or fp16)
    into ``os.environ`` and never clears it, so after one bf16 config every later Trainer in the process
    autocasts (5.x keeps it on the config instead). Without this, the 4.57 tox env fails by test order.
    """
    before = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    yield
    for key in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in before]:
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def dataset():
    return make_dataset()


def tiny_args(tmp_path, **overrides):
    """A NeFTConfig for fast CPU runs on the tiny models."""
    from neft_trl import NeFTConfig

    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=32, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    values.update(overrides)
    return NeFTConfig(**values)
