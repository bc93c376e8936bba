"""The one freeze/restore mechanism (``neft_trl.freezing``) and the three places that use it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from torch import nn

from neft_trl.freezing import FrozenFlags, frozen_parameters
from neft_trl.mask import NeuronMask
from neft_trl.neurons import build_neuron_map
from neft_trl.selectors.tracing import frozen
from neft_trl.training.delta import DeltaTraining
from neft_trl.training.hooks import GradientMaskTraining


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _mixed_model() -> nn.Module:
    model = make_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag that is not the default must come back too
    return model


def test_frozen_parameters_restores_each_flag_even_after_an_error():
    model = _mixed_model()
    before = _flags(model)
    with pytest.raises(KeyError), frozen_parameters(model):
        assert not any(_flags(model).values())
        raise KeyError("inside the block")
    assert _flags(model) == before and before["model.embed_tokens.weight"] is False


def test_flags_leave_parameters_created_while_frozen_alone_and_refuse_a_second_freeze():
    model = _mixed_model()
    before = _flags(model)
    flags = FrozenFlags()
    flags.freeze(model)
    assert flags.active
    with pytest.raises(RuntimeError, match="detach\\(\\) / restore\\(\\) first"):
        flags.freeze(model)
    model.extra = nn.Linear(2, 2)  # e.g. a neuron delta: trainable, created after the freeze
    flags.restore()
    assert not flags.active
    assert {n: f for n, f in _flags(model).items() if not n.startswith("extra.")} == before
    assert model.extra.weight.requires_grad


@pytest.mark.parametrize("training_cls", [GradientMaskTraining, DeltaTraining])
def test_training_modes_restore_the_flags_on_detach(training_cls):
    model = _mixed_model()
    before = _flags(model)
    neuron_map = build_neuron_map(model)
    chosen = {g.key: torch.arange(g.size) % 3 == 0 for g in neuron_map.groups}
    training = training_cls(model, neuron_map, NeuronMask.from_groups(neuron_map, chosen))
    training.attach()
    assert sum(p.requires_grad for p in model.parameters()) < len(before)
    with pytest.raises(RuntimeError, match="already frozen"):
        training.attach() if training_cls is GradientMaskTraining else training.freeze_model()
    training.detach()
    assert _flags(model) == before


def test_tracing_frozen_with_input_grads_restores_flags_and_removes_its_hook():
    model = _mixed_model()
    before = _flags(model)
    with frozen(model, input_grads=True):
        out = model(torch.tensor([[3, 4, 5]])).logits
        assert out.requires_grad and not any(_flags(model).values())
    assert _flags(model) == before
    assert not model.model.embed_tokens._forward_hooks
