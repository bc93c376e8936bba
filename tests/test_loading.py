"""``neft_trl.loading``: the one way neft_trl loads a model from a folder, with dtype and placement explicit."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from neft_trl.loading import load_model, model_skeleton


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    model = make_model("llama").to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_load_model_defaults_to_fp32_on_cpu_and_auto_keeps_the_saved_dtype(bf16_folder):
    folder, saved = bf16_folder
    fp32 = load_model(folder)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert {p.device.type for p in fp32.parameters()} == {"cpu"}
    kept = load_model(folder, dtype="auto")
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    for name, param in kept.named_parameters():
        assert torch.equal(param, saved[name]), name  # bit-exact
        assert torch.equal(dict(fp32.named_parameters())[name], saved[name].float()), name


def test_model_skeleton_reads_shapes_only(bf16_folder):
    folder, saved = bf16_folder
    skeleton = model_skeleton(folder, dtype=torch.float16)
    params = dict(skeleton.named_parameters())
    assert {p.device.type for p in params.values()} == {"meta"}
    assert {p.dtype for p in params.values()} == {torch.float16}
    assert {n: p.shape for n, p in params.items()} == {n: p.shape for n, p in saved.items()}

