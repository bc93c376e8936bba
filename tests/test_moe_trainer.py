"""Mixture-of-experts models in the trainer, saved expert deltas, and bitsandbytes' fused experts."""

from __future__ import annotations

import pytest
import torch
from moe_fixtures import logits, make_moe, random_mask, skip_without_fused_experts, train
from transformers import AutoModelForCausalLM

from neft_trl.mask import NeuronMask
from neft_trl.neurons import build_neuron_map
from neft_trl.training.delta import DeltaTraining

skip_without_fused_experts()


def test_bitsandbytes_leaves_fused_experts_unquantized_which_is_a_clear_error(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    make_moe("mixtral").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert type(model.model.layers[0].mlp.experts.gate_up_proj).__name__ == "Parameter"  # bnb skipped it
    with pytest.raises(ValueError, match=r"routed experts \(model\.layers\.0\.mlp\.experts\.gate_up_proj.*without "
                                         r"quantization_config"):
        build_neuron_map(model)


@pytest.mark.parametrize("mode", ["hooks", "delta"])
def test_trainer_selects_and_trains_expert_neurons(tmp_path, mode):
    from conftest import make_dataset, make_tokenizer, tiny_args

    from neft_trl import NeFTSFTTrainer

    model = make_moe("qwen2_moe")
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    args = tiny_args(tmp_path, selector="activation", selector_kwargs={"calibration_batches": 2},
                     neuron_ratio=0.2, neft_mode=mode, neuron_scope="per_expert", save_strategy="no")
    trainer = NeFTSFTTrainer(model, make_dataset(), args=args, processing_class=make_tokenizer())
    trainer.train()
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)  # the router never trains
    report = trainer.neuron_report()
    assert report.masks[0].per_expert == trainer.neuron_mask.per_expert_counts()
    assert "layer_1_expert_3_neurons" in "".join(report.scalars())
    assert "Neurons per routed expert" in report.to_markdown()
    trainer.save_model()
    assert NeuronMask.load(args.output_dir) == trainer.neuron_mask


def test_saved_expert_deltas_load_and_merge_into_a_fresh_model(tmp_path):
    from neft_trl import load_neuron_delta, merge_neuron_delta
    from neft_trl.plots import plot_mask

    model = make_moe("qwen2_moe")
    neuron_map = build_neuron_map(model)
    mask = random_mask(neuron_map, model)
    training = DeltaTraining(model, neuron_map, mask)
    train(model, training)
    trained = logits(model)
    training.save(str(tmp_path))
    loaded = load_neuron_delta(make_moe("qwen2_moe"), tmp_path)  # a fresh model: views installed on load
    torch.testing.assert_close(logits(loaded), trained, rtol=0, atol=1e-6)
    merged = merge_neuron_delta(make_moe("qwen2_moe"), tmp_path)
    torch.testing.assert_close(logits(merged), trained, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="neft_experts"):
        load_neuron_delta(make_moe("qwen2_moe", experts=2), tmp_path)  # experts 2, 3 are absent there
    png = plot_mask(mask, tmp_path / "mask.png")
    assert png.stat().st_size > 1000
