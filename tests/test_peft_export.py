"""Export to a PEFT LoRA adapter: the LoRA form of a neuron delta, delta and hooks runs on Llama and GPT-2
(Conv1D, biases) loaded back with PeftModel (logits and merge_and_unload), a 4-bit base, the command, and the
errors for a wrong base model or a folder that is not a run."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import make_dataset, make_model, make_tokenizer, tiny_args
from transformers.pytorch_utils import Conv1D

from neft_trl import NeFTSFTTrainer, export_peft_adapter, load_neuron_delta
from neft_trl.cli import main
from neft_trl.training.delta_io import DELTA_FILENAME
from neft_trl.training.delta_layer import NeuronDelta
from neft_trl.training.peft_export import ADAPTER_CONFIG_FILENAME, ADAPTER_FILENAME, lora_factors

peft = pytest.importorskip("peft")

#: PEFT warnings that would mean the adapter is not what PEFT expects (a silent fix-up or unloaded weights).
BAD_WARNINGS = ("fan_in_fan_out", "missing adapter keys", "unexpected", "lora_bias")


def _logits(model, train_mode=False):
    """Eval mode (GPT-2 has dropout); a 4-bit model on CPU runs in train mode (see test_quantized._logits)."""
    model.train(train_mode)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_model(base, adapter):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(adapter))
    bad = [str(w.message) for w in caught if any(b in str(w.message) for b in BAD_WARNINGS)]
    assert not bad, bad
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(arch, mode)``: a saved NeFT run (2 steps) and the trained model's logits, built once per module."""
    made: dict[tuple[str, str], tuple] = {}

    def get(arch: str, mode: str):
        if (arch, mode) not in made:
            folder = tmp_path_factory.mktemp(f"{arch}-{mode}")
            args = tiny_args(folder, selector="random", neuron_ratio=0.25, neft_mode=mode, weight_decay=0.0,
                             max_steps=2)
            trainer = NeFTSFTTrainer(make_model(arch), make_dataset(), args=args, processing_class=make_tokenizer())
            trainer.train()
            trainer.save_model(str(folder / "run"))
            made[arch, mode] = folder / "run", _logits(trainer.model), trainer.neuron_mask
        return made[arch, mode]

    return get


@pytest.mark.parametrize("is_input", [True, False])
def test_lora_factors_multiply_to_the_dense_delta(is_input):
    delta = NeuronDelta(torch.tensor([1, 4, 5]), is_input, 6, 7, with_bias=is_input)
    torch.nn.init.normal_(delta.weight)
    if delta.bias is not None:
        torch.nn.init.normal_(delta.bias)
    for rank in (3, 5):  # exact, and padded with zeros
        f = lora_factors(delta, rank, lora_bias=True)
        assert f["lora_A.weight"].shape == (rank, 6) and f["lora_B.weight"].shape == (7, rank)
        assert torch.equal(f["lora_B.weight"] @ f["lora_A.weight"], delta.dense())  # bit-exact: one factor is 0/1
        expected_bias = torch.zeros(7)
        if is_input:
            expected_bias[delta.index] = delta.bias.detach()
        assert torch.equal(f["lora_B.bias"], expected_bias)
    with pytest.raises(ValueError, match="rank 2 is below the delta's 3 neurons"):
        lora_factors(delta, 2, lora_bias=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_delta_run_adapter_reproduces_the_neft_model(tmp_path, runs, arch):
    run, expected, mask = runs(arch, "delta")
    out = export_peft_adapter(run, tmp_path / "adapter")
    config = json.loads((out / ADAPTER_CONFIG_FILENAME).read_text())
    ranks = {name: int(sel.sum()) for name, sel in mask.selected.items() if sel.any()}
    assert config["rank_pattern"] == ranks and config["alpha_pattern"] == ranks  # scaling exactly 1 per module
    assert config["r"] == config["lora_alpha"] == max(ranks.values())  # and 1 for engines reading only r/alpha
    assert config["fan_in_fan_out"] is (arch == "gpt2") and config["lora_bias"] is (arch == "gpt2")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"

    assert not torch.allclose(_logits(make_model(arch)), expected, atol=1e-3)  # the adapter has work to do
    model = _peft_model(make_model(arch), out)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)
    if arch == "gpt2":  # the in-neurons' bias deltas reached the merged Conv1D bias
        assert isinstance(merged.transformer.h[0].mlp.c_fc, Conv1D)
        assert not torch.equal(merged.transformer.h[0].mlp.c_fc.bias, make_model(arch).transformer.h[0].mlp.c_fc.bias)


def test_uniform_rank_pads_every_module_to_one_rank(tmp_path, runs):
    run, expected, mask = runs("llama", "delta")
    out = export_peft_adapter(run, tmp_path / "uniform", uniform_rank=True)
    config = json.loads((out / ADAPTER_CONFIG_FILENAME).read_text())
    top = max(int(sel.sum()) for sel in mask.selected.values())
    assert config["rank_pattern"] == {} and config["r"] == config["lora_alpha"] == top
    from safetensors.torch import load_file

    tensors = load_file(out / ADAPTER_FILENAME)
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {top}
    torch.testing.assert_close(_logits(_peft_model(make_model("llama"), out)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooks_run_adapter_is_trained_minus_base(tmp_path, runs, arch):
    run, expected, _ = runs(arch, "hooks")
    base = make_model(arch)
    if arch == "gpt2":  # the base as a folder, as the command passes it
        base.save_pretrained(tmp_path / "base")
        base = tmp_path / "base"
    out = export_peft_adapter(run, tmp_path / "adapter", base_model=base)
    model = _peft_model(make_model(arch), out)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model.merge_and_unload()), expected, rtol=1e-5, atol=1e-5)


def test_hooks_run_with_another_base_is_refused_naming_the_tensor(tmp_path, runs):
    run, _, mask = runs("llama", "hooks")
    with pytest.raises(ValueError, match="pass base_model"):
        export_peft_adapter(run, tmp_path / "a")
    with pytest.raises(ValueError, match=r"differs from the base model outside the selected neurons \(16 tensors\)"):
        export_peft_adapter(run, tmp_path / "a", base_model=make_model("llama", seed=1))
    base = make_model("llama")
    name = "model.layers.1.mlp.up_proj"
    frozen_row = int((~mask.selected[name]).nonzero()[0])
    with torch.no_grad():
        base.model.layers[1].mlp.up_proj.weight[frozen_row, 0] += 1e-3
    with pytest.raises(ValueError, match=rf"{name}\.weight: 1 values differ .* in non-selected neurons"):
        export_peft_adapter(run, tmp_path / "a", base_model=base)
    assert not (tmp_path / "a").exists()  # nothing written on refusal


def test_bad_folders_and_wrong_models_are_clear_errors(tmp_path, runs):
    run, _, _ = runs("llama", "delta")
    with pytest.raises(ValueError, match=r"different model.*\[out=48, in=32\].*\[out=40, in=32\]"):
        export_peft_adapter(run, tmp_path / "a", base_model=make_model("qwen2"))
    with pytest.raises(FileNotFoundError, match="No NeFT run folder"):
        export_peft_adapter(tmp_path / "missing", tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a NeFT run folder: expected neft_delta.safetensors"):
        export_peft_adapter(tmp_path / "empty", tmp_path / "a")
    with pytest.raises(ValueError, match="its own folder"):
        export_peft_adapter(run, run)


def test_export_command_writes_the_adapter_and_reports_sizes(tmp_path, runs, capsys):
    run, expected, _ = runs("gpt2", "delta")
    assert main(["export", "--format", "peft", str(run), str(tmp_path / "adapter")]) == 0
    printed = capsys.readouterr().out
    adapter_bytes = (tmp_path / "adapter" / ADAPTER_FILENAME).stat().st_size
    assert f"{adapter_bytes:,} bytes" in printed and f"{(run / DELTA_FILENAME).stat().st_size:,} bytes" in printed
    torch.testing.assert_close(_logits(_peft_model(make_model("gpt2"), tmp_path / "adapter")), expected,
                               rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path), str(tmp_path / "b")]) == 2
    assert "not a NeFT run folder" in capsys.readouterr().err


def test_four_bit_base_takes_the_adapter_like_a_qlora_adapter(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model("llama").save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")

    def nf4():
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))

    args = tiny_args(tmp_path, selector="random", neuron_ratio=0.5, learning_rate=5e-2, max_steps=2, weight_decay=0.0)
    trainer = NeFTSFTTrainer(str(tmp_path / "base"), make_dataset(), args=args,
                             quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    out = export_peft_adapter(tmp_path / "run", tmp_path / "adapter", base_model=tmp_path / "base")

    expected = _logits(load_neuron_delta(nf4(), tmp_path / "run"), train_mode=True)
    assert not torch.allclose(_logits(nf4(), train_mode=True), expected, atol=1e-3)
    got = _logits(_peft_model(nf4(), out), train_mode=True)
    # The same 4-bit base and the same fp32 update (B @ A is the delta exactly): measured max |diff| 0.0 on this
    # CPU; the tolerance allows for kernels that sum the LoRA product in another order.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_delta_file_without_a_recorded_layout_needs_the_base(tmp_path):
    from neft_trl.training.delta_io import save_neuron_delta

    delta = NeuronDelta(torch.tensor([0, 2]), True, 32, 48)
    torch.nn.init.normal_(delta.weight)
    name = "model.layers.0.mlp.up_proj"
    save_neuron_delta({name: delta}, tmp_path / "old", {"neft_mode": "delta"})  # as saved before fan_in_fan_out
    with pytest.raises(ValueError, match="does not record its layers' weight layout.*pass base_model"):
        export_peft_adapter(tmp_path / "old", tmp_path / "a")
    out = export_peft_adapter(tmp_path / "old", tmp_path / "a", base_model=make_model("llama"))
    assert json.loads((out / ADAPTER_CONFIG_FILENAME).read_text())["fan_in_fan_out"] is False
    save_neuron_delta({name: delta}, tmp_path / "mixed", {"neft_mode": "delta", "fan_in_fan_out": "mixed"})
    with pytest.raises(ValueError, match="mix Conv1D"):
        export_peft_adapter(tmp_path / "mixed", tmp_path / "b")
