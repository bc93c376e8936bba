"""Hooks mode and the optimizers transformers offers: each keeps frozen neurons bit-identical or is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import make_dataset, make_tokenizer, tiny_args
from test_trainer_hooks import assert_only_selected_changed
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.training_args import OptimizerNames

from neft_trl import NeFTSFTTrainer
from neft_trl.errors import UsageError
from neft_trl.training.optimizers import REFUSED_HOOKS_OPTIMIZERS, VERIFIED_HOOKS_OPTIMIZERS

ALL = [o.value for o in OptimizerNames]


def model_with_8bit_sized_weights():
    """A tiny Llama whose MLP weights (64 x 96 = 6144 elements) pass bitsandbytes' min_8bit_size (4096), so its
    8-bit optimizers really keep 8-bit state instead of falling back to 32-bit on small tensors."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=2, bos_token_id=2, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).float()


def trainer_for(tmp_path, optim, **overrides):
    args = tiny_args(tmp_path, **{"optim": optim, "weight_decay": 0.1, "max_steps": 2, "neuron_ratio": 0.2,
                                  "neft_mode": "hooks", **overrides})
    return NeFTSFTTrainer(model_with_8bit_sized_weights(), make_dataset(16), selector="random", args=args,
                          processing_class=make_tokenizer())


def test_every_optim_value_is_either_verified_or_refused_with_a_reason():
    assert VERIFIED_HOOKS_OPTIMIZERS <= set(ALL) and REFUSED_HOOKS_OPTIMIZERS.keys() <= set(ALL)
    assert not VERIFIED_HOOKS_OPTIMIZERS & REFUSED_HOOKS_OPTIMIZERS.keys()


@pytest.mark.parametrize("optim", sorted(VERIFIED_HOOKS_OPTIMIZERS))
def test_a_verified_optimizer_keeps_frozen_neurons_bit_identical(tmp_path, optim):
    trainer = trainer_for(tmp_path, optim)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
    assert type(optimizer).__module__.split(".")[0] in ("torch", "transformers", "bitsandbytes")
    if "8bit" in optim:  # the MLP weights really have 8-bit state (not bitsandbytes' 32-bit small-tensor fallback)
        up = trainer.model.model.layers[0].mlp.up_proj.weight
        assert optimizer.state[up]["state1"].dtype == torch.uint8
    assert_only_selected_changed(trainer, before)


@pytest.mark.parametrize("optim", sorted(set(ALL) - VERIFIED_HOOKS_OPTIMIZERS))
def test_other_optimizers_are_refused_in_hooks_mode_naming_delta(tmp_path, optim):
    with pytest.raises(UsageError, match=rf"optim='{optim}' cannot train in neft_mode='hooks': .*"
                                          r"Use neft_mode='delta'.*'adamw_torch'") as err:
        trainer_for(tmp_path, optim)
    assert REFUSED_HOOKS_OPTIMIZERS.get(optim, "not verified") in str(err.value)
    trainer_for(tmp_path / "delta", optim, neft_mode="delta")  # the named fix is accepted


@pytest.mark.parametrize("optim", sorted(o for o, why in REFUSED_HOOKS_OPTIMIZERS.items() if "8-bit" in why))
def test_the_refused_8bit_optimizers_really_move_zero_gradient_rows(optim):
    """The reason for refusing them, measured on bitsandbytes' own optimizer: rows with a zero gradient move."""
    bnb = pytest.importorskip("bitsandbytes")
    cls = {"adamw": bnb.optim.AdamW, "ademamix": bnb.optim.AdEMAMix, "lion": bnb.optim.Lion}[
        next(k for k in ("adamw", "ademamix", "lion") if k in optim)]
    weight = torch.nn.Parameter(torch.randn(64, 96, generator=torch.Generator().manual_seed(0)))
    before = weight.detach().clone()
    optimizer = cls([weight], lr=1e-2, weight_decay=0.0, optim_bits=8, is_paged="paged" in optim)
    for step in range(3):
        grad = torch.randn(64, 96, generator=torch.Generator().manual_seed(step + 1))
        grad[::2] = 0  # even rows: frozen neurons
        weight.grad = grad
        optimizer.step()
    assert optimizer.state[weight]["state1"].dtype == torch.uint8  # really 8-bit state
    assert (weight[::2] != before[::2]).any(), f"{optim} left zero-gradient rows in place: verify it instead"


def test_optimizer_classes_passed_directly(tmp_path):
    args = tiny_args(tmp_path, weight_decay=0.1, max_steps=2, neuron_ratio=0.2, neft_mode="hooks")
    dataset, tokenizer = make_dataset(16), make_tokenizer()
    verified = NeFTSFTTrainer(model_with_8bit_sized_weights(), dataset, selector="random", args=args,
                              processing_class=tokenizer, optimizer_cls_and_kwargs=(torch.optim.SGD, {}))
    before = {n: p.detach().clone() for n, p in verified.model.named_parameters()}
    verified.train()
    assert isinstance(verified.optimizer.optimizer, torch.optim.SGD)
    assert_only_selected_changed(verified, before)
    # ASGD shrinks every element by its eta * lambd each step, zero gradient or not: it must be refused
    with pytest.raises(UsageError, match=r"optimizer_cls_and_kwargs='ASGD' is not verified.*neft_mode='delta'"):
        NeFTSFTTrainer(model_with_8bit_sized_weights(), dataset, selector="random", args=args,
                       processing_class=tokenizer, optimizer_cls_and_kwargs=(torch.optim.ASGD, {}))
