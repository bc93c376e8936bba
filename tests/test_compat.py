"""The transformers/TRL version differences neft_trl handles (neft_trl/compat.py, NeFTConfig.from_training_args).

These run on whatever transformers is installed; tox runs them on 4.57.x, 5.0.x and the latest 5.x, where the
differences are real (renamed checkpointing flags, ``to_dict`` token masking, ``create_optimizer``'s signature).
"""

from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import make_dataset, make_model, make_tokenizer, tiny_args
from transformers import Trainer, TrainingArguments
from trl import SFTConfig

from neft_trl import NeFTConfig, NeFTSFTTrainer
from neft_trl.compat import activation_checkpointing_on, model_checkpoints_activations


def test_checkpointing_flag_is_read_under_either_name():
    assert activation_checkpointing_on(SimpleNamespace(gradient_checkpointing=True)) is True  # 4.57 / 5.0
    assert activation_checkpointing_on(SimpleNamespace(activation_checkpointing=True)) is True  # after v6
    assert activation_checkpointing_on(SimpleNamespace(activation_checkpointing=False, gradient_checkpointing=False)) \
        is False
    assert activation_checkpointing_on(SimpleNamespace()) is False


def test_checkpointing_flag_of_the_installed_training_arguments(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name is deprecated in newer 5.x
        assert activation_checkpointing_on(tiny_args(tmp_path, gradient_checkpointing=True)) is True
        assert activation_checkpointing_on(tiny_args(tmp_path, gradient_checkpointing=False)) is False


def test_model_checkpointing_state_is_read_without_deprecation_warnings():
    model = make_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_checkpoints_activations(model) is False
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_checkpoints_activations(model) is True
    assert model_checkpoints_activations(torch.nn.Linear(2, 2)) is False


@pytest.mark.parametrize("make_args", [
    lambda d: TrainingArguments(output_dir=str(d), use_cpu=True, report_to=[], lr_scheduler_type="cosine",
                                save_strategy="steps", save_steps=7, weight_decay=0.1),
    lambda d: SFTConfig(output_dir=str(d), use_cpu=True, report_to="none", hub_token="hf_real", max_length=77,
                        eval_strategy="steps", eval_steps=3, learning_rate=3e-4),
], ids=["TrainingArguments", "SFTConfig"])
def test_from_training_args_copies_every_field_and_the_real_token(tmp_path, make_args):
    args = make_args(tmp_path)
    config = NeFTConfig.from_training_args(args)
    assert type(config) is NeFTConfig and config.selector == "cosine"  # NeFT's defaults on top
    original, copied = args.to_dict(), config.to_dict()
    assert {k: (v, copied.get(k)) for k, v in original.items() if copied.get(k) != v} == {}
    # to_dict() masks tokens as "<HUB_TOKEN>"; 4.57 also copied its "<PUSH_TO_HUB_TOKEN>" into hub_token.
    assert config.hub_token == args.hub_token
    assert config.hub_token in (None, "hf_real")


def test_create_optimizer_works_with_the_installed_signature(tmp_path):
    """Trainer.create_optimizer takes ``model`` in 5.23+ and nothing in 4.57/5.0; NeFT's override takes both."""
    trainer = NeFTSFTTrainer(make_model("llama"), make_dataset(8), processing_class=make_tokenizer(),
                             args=tiny_args(tmp_path, selector="random", neuron_ratio=0.25))
    takes_model = "model" in inspect.signature(Trainer.create_optimizer).parameters
    optimizer = trainer.create_optimizer(trainer.model) if takes_model else trainer.create_optimizer()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert in_optimizer == trainable and trainable  # selection ran first: only the selected projections
    assert trainer.neuron_mask is not None and 0 < trainer.neuron_mask.num_selected < trainer.neuron_mask.num_total
