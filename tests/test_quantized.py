"""NeFT on bitsandbytes 4-bit and 8-bit models (CPU): a tiny Llama saved with save_pretrained and reloaded
with a BitsAndBytesConfig, trained through neuron deltas by path, exactly as a user would."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer, tiny_args
from datasets import Dataset
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from neft_trl import NeFTSFTTrainer, load_neuron_delta, merge_neuron_delta
from neft_trl.layers import is_quantized

pytest.importorskip("bitsandbytes")

SENTENCE = "the cat sat on the red mat and then the dog ran under the big tree"
CONFIGS = {
    "nf4-double": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True),
    "fp4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def _trainer(tmp_path, base_path, quant, **overrides):
    values = dict(selector="random", neuron_ratio=0.5, learning_rate=5e-2, max_steps=6, weight_decay=0.0)
    args = tiny_args(tmp_path, **{**values, **overrides})
    data = Dataset.from_dict({"text": [SENTENCE] * 8})
    return NeFTSFTTrainer(base_path, data, args=args, quantization_config=CONFIGS[quant]())


def _fixed_batch_loss(model) -> float:
    ids = make_tokenizer()(SENTENCE + " <eos>", return_tensors="pt").input_ids
    model.train()  # see _logits
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def _logits(model):
    """Forward in train mode (no dropout in these configs): in eval mode without grad, bitsandbytes 0.50 on CPU
    repacks 4-bit weights in place (bf16 absmax; fails for in_features < blocksize), so it would change the
    frozen weights under test."""
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("quant", list(CONFIGS))
def test_quantized_model_trains_deltas_and_keeps_its_weights(tmp_path, base_path, quant):
    trainer = _trainer(tmp_path, base_path, quant)
    model = trainer.model
    assert trainer.neft_mode == "delta"  # auto picks delta for a quantized model
    assert any(is_quantized(m) for m in model.modules())
    assert "_hf_peft_config_loaded" not in vars(model)  # the adapter flag was raised only during __init__
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)  # no bf16 cast
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = _fixed_batch_loss(model)

    trainer.train()

    after = model.state_dict()
    for name, value in before.items():
        assert value.dtype == after[name].dtype and torch.equal(value, after[name]), name  # byte-identical
    deltas = trainer.neuron_training.deltas
    assert deltas and all(d.weight.dtype == torch.float32 and d.weight.abs().sum() > 0 for d in deltas.values())
    optimized = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert optimized == trainer.neuron_mask.trainable_parameters
    assert _fixed_batch_loss(model) < loss_before - 0.05


def test_hooks_mode_on_a_quantized_model_is_a_clear_error(tmp_path, base_path):
    with pytest.raises(ValueError, match="neft_mode='hooks' cannot train quantized weights.*'delta'"):
        _trainer(tmp_path, base_path, "nf4-double", neft_mode="hooks")


def test_quantization_config_in_two_places_is_an_error(tmp_path, base_path):
    args = tiny_args(tmp_path, model_init_kwargs={"quantization_config": CONFIGS["int8"]()})
    with pytest.raises(ValueError, match="only one place"):
        NeFTSFTTrainer(base_path, Dataset.from_dict({"text": [SENTENCE]}), args=args,
                       quantization_config=CONFIGS["int8"]())


def test_quantized_delta_loads_onto_a_fresh_base_and_merges_to_full_precision(tmp_path, base_path):
    trainer = _trainer(tmp_path, base_path, "nf4-double")
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    expected = _logits(trainer.model)

    # dtype as the trainer loaded it (fp32): transformers 4.x loads a bnb model's other weights in fp16 by default.
    fresh = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=CONFIGS["nf4-double"](),
                                                 dtype=torch.float32)
    torch.testing.assert_close(_logits(load_neuron_delta(fresh, out)), expected)

    quantized = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=CONFIGS["nf4-double"](),
                                                     dtype=torch.float32)
    merged = merge_neuron_delta(quantized, out, dtype=torch.float32)
    assert not any(is_quantized(m) for m in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain, no quantization config
    assert getattr(reloaded.config, "quantization_config", None) is None
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_reaches_the_deltas(tmp_path, base_path):
    trainer = _trainer(tmp_path, base_path, "nf4-double", gradient_checkpointing=True, max_steps=2)
    trainer.train()
    assert all(d.weight.abs().sum() > 0 for d in trainer.neuron_training.deltas.values())


def test_a_non_bitsandbytes_quantized_model_is_refused_with_the_fix():
    from neft_trl.layers import is_quantized_model

    model = make_model("llama")
    assert not is_quantized_model(model)
    model.is_quantized = True  # what transformers sets for GPTQ/AWQ/... models, whose layers are not nn.Linear
    model.hf_quantizer = type("Q", (), {"quantization_config": type("C", (), {"quant_method": "gptq"})()})()
    with pytest.raises(ValueError, match="quantized with gptq, which NeFT cannot train: .*BitsAndBytesConfig"):
        is_quantized_model(model)
