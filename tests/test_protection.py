"""``protect_ratio``: each layer's most active candidates are never selected, the budget is unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model, make_token_batches

from neft_trl import NeuronMask, select_neurons
from neft_trl.budget import Budget
from neft_trl.errors import UsageError
from neft_trl.neurons import build_neuron_map
from neft_trl.protection import PROTECT_BATCHES
from neft_trl.selectors.activation import mean_activations
from neft_trl.selectors.base import SelectionContext


def _activity_order(model, batches, unit: str) -> dict[str, torch.Tensor]:
    """Each group's candidates, most active first, measured outside the selection (by the same function)."""
    neuron_map = build_neuron_map(model, unit)
    context = SelectionContext(model=model, neuron_map=neuron_map, budget=Budget.resolve(neuron_ratio=0.1),
                               batches=batches, show_progress=False)
    means = mean_activations(context, 16, "test")
    return {g.key: torch.sort(means[g.key], descending=True, stable=True).indices for g in neuron_map.groups}


@pytest.mark.parametrize("unit", ["mlp", "vector"])
def test_the_most_active_are_skipped_and_the_next_ones_taken(unit):
    """The activation selector under protection keeps exactly the ranks just below the protected share, in every
    group, and trains as many parameters as without protection."""
    model, batches = make_model("llama"), make_token_batches()
    order = _activity_order(model, batches, unit)
    plain = select_neurons(model, batches, "activation", neuron_ratio=0.25, neuron_unit=unit, show_progress=False)
    guarded = select_neurons(model, batches, "activation", neuron_ratio=0.25, neuron_unit=unit, protect_ratio=0.3,
                             show_progress=False)
    assert guarded.trainable_parameters == plain.trainable_parameters
    assert guarded.metadata["protect_ratio"] == "0.3"
    neuron_map = build_neuron_map(model, unit)
    protected_total = 0
    for group in neuron_map.groups:
        size, kept = group.size, guarded.selected[group.projections[0].name]
        protected, wanted = math.ceil(0.3 * size), int(kept.sum())
        protected_total += protected
        expected = torch.zeros(size, dtype=torch.bool)
        expected[order[group.key][protected:protected + wanted]] = True
        assert torch.equal(kept, expected), group.key
        assert not kept[order[group.key][:protected]].any()
    assert guarded.metadata["protected_candidates"] == str(protected_total)
    assert guarded != plain


def test_protection_applies_to_any_selector_and_survives_save(tmp_path):
    model, batches = make_model("qwen2"), make_token_batches()
    order = _activity_order(model, batches, "mlp")
    mask = select_neurons(model, batches, "random", neuron_ratio=0.5, protect_ratio=0.25, seed=3, show_progress=False)
    for group in build_neuron_map(model, "mlp").groups:
        top = order[group.key][: math.ceil(0.25 * group.size)]
        assert not mask.selected[group.projections[0].name][top].any()
    loaded = NeuronMask.load(mask.save(tmp_path / "m.safetensors"))
    assert loaded == mask and loaded.metadata["protect_ratio"] == "0.25"


def test_bad_protection_names_the_fix():
    model, batches = make_model("llama"), make_token_batches()
    with pytest.raises(UsageError, match=r"protect_ratio must be a share in \[0, 1\)"):
        select_neurons(model, batches, "random", neuron_ratio=0.1, protect_ratio=1.0)
    with pytest.raises(UsageError, match="set protect_ratio=0"):
        select_neurons(model, None, "random", neuron_ratio=0.1, protect_ratio=0.1)
    with pytest.raises(UsageError, match=r"asks 60\.\d% of the candidates of .*only 50\.0% of them selectable: lower "
                                         "protect_ratio or the budget"):
        select_neurons(model, batches, "random", neuron_ratio=0.6, protect_ratio=0.5, show_progress=False)
    # without protection a data-free selector needs no batches
    assert select_neurons(model, None, "random", neuron_ratio=0.1, protect_ratio=0).num_selected > 0


@pytest.mark.parametrize("mode", ["hooks", "delta"])
def test_the_trainer_leaves_protected_channels_bit_identical(tmp_path, mode):
    """Through the trainer (``NeFTConfig.protect_ratio``): every unselected neuron, the protected ones included, is
    bit-identical after training, every selected one moved, and the run's mask records the protection."""
    from conftest import make_dataset, make_tokenizer, tiny_args
    from test_trainer_hooks import assert_only_selected_changed

    from neft_trl import NeFTSFTTrainer

    model = make_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = tiny_args(tmp_path, selector="activation", neuron_ratio=0.25, protect_ratio=0.25, neft_mode=mode,
                     weight_decay=0.1, selector_kwargs={"calibration_batches": 2})
    trainer = NeFTSFTTrainer(model, make_dataset(), args=args, processing_class=make_tokenizer())
    trainer.train()
    assert trainer.neuron_mask.metadata["protect_ratio"] == "0.25"
    if mode == "delta":
        trainer.neuron_training.merge()  # the weights then differ from before exactly on the selected neurons
    assert_only_selected_changed(trainer, before)


def test_protection_draws_its_batches_from_the_seed_alone():
    """A batch source that shuffles from the global RNG (as a trainer's dataloader does) gives the protection the
    same batches whatever random numbers the caller drew before selecting: the mask depends on ``seed`` alone."""
    model, ready = make_model("llama"), make_token_batches()
    drawn: list[list[int]] = []

    def shuffled(count):
        order = torch.randint(len(ready), (count,)).tolist()
        drawn.append(order)
        return (ready[i] for i in order)

    masks = []
    for caller_seed in (0, 1):
        torch.manual_seed(caller_seed)
        masks.append(select_neurons(model, shuffled, "random", neuron_ratio=0.25, protect_ratio=0.3, seed=7,
                                    show_progress=False))
    assert drawn[0] == drawn[1]
    assert masks[0] == masks[1]


def test_the_activation_selector_reuses_the_protections_measurement():
    """Protection and ``selector="activation"`` measure the same 16 seeded batches: the model runs them once."""
    model, batches = make_model("llama"), make_token_batches()
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        select_neurons(model, batches, "activation", neuron_ratio=0.25, protect_ratio=0.3, show_progress=False,
                       calibration_batches=PROTECT_BATCHES)
        assert len(forwards) == PROTECT_BATCHES
        forwards.clear()
        select_neurons(model, batches, "activation", neuron_ratio=0.25, protect_ratio=0.3, show_progress=False,
                       calibration_batches=8)  # another count is another measurement
        assert len(forwards) == PROTECT_BATCHES + 8
        forwards.clear()
        context = SelectionContext(model=model, neuron_map=build_neuron_map(model, "mlp"),
                                   budget=Budget.resolve(neuron_ratio=0.1), batches=batches, show_progress=False)
        first, second = (torch.cat(list(mean_activations(context, 4, "test").values())) for _ in range(2))
        assert torch.equal(first, second)
        assert len(forwards) == 8  # outside a selection nothing is kept: a reused context is never stale
    finally:
        handle.remove()
