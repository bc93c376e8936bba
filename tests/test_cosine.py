"""The paper's cosine selector: an explicit reference with known changed neurons, and the delta probe.

The probe is checked against a real in-place fine-tune of the same projections with the same optimizer,
and for what it must not do: change a weight, a flag, a hook, the train/eval mode, the trainer's optimizer
or the RNG stream of the run.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import make_dataset, make_model, make_tokenizer, tiny_args
from test_selectors import assert_untouched, context, make_batches, snapshot
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from neft_trl import NeFTSFTTrainer, build_neuron_map
from neft_trl.selection import run_selector
from neft_trl.selectors.probe import default_probe_steps, run_probe

#: (module, stored-weight dimension that indexes neurons, neuron, relative size of the change)
CHANGES = {
    "llama": [("model.layers.0.mlp.up_proj", 0, 3, 1e-3), ("model.layers.1.mlp.down_proj", 1, 5, 1e-4),
              ("model.layers.1.mlp.up_proj", 0, 40, 1e-6)],
    "gpt2": [("transformer.h.0.mlp.c_fc", 1, 3, 1e-3), ("transformer.h.1.mlp.c_proj", 0, 5, 1e-4),
             ("transformer.h.1.mlp.c_fc", 1, 60, 1e-6)],
}


def reference_with_known_changes(model, arch):
    """A copy in which only the listed neuron vectors move, each by random noise of the given relative size
    (noise, not scaling: a scaled vector keeps cosine 1)."""
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, dim, neuron, size in CHANGES[arch]:
            vector = modules[name].weight.select(dim, neuron)
            vector += torch.randn(vector.shape, generator=g) * vector.abs().mean() * size
    return reference


def chosen(mask):
    return {(name, n) for name in mask.selected for n in mask.indices(name).tolist()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reference_picks_exactly_the_changed_neurons_in_order_of_change(arch):
    model = make_model(arch)
    reference = reference_with_known_changes(model, arch)
    expected = [(name, n) for name, _, n, _ in CHANGES[arch]]
    # the 1e-6 change gives cosine 1 - ~1e-13, which fp32 cosine values cannot tell from an unchanged neuron;
    # the order holds across layers, so all layers are ranked in one pool (the paper's scope)
    for k in (3, 2, 1):
        mask = run_selector(context(model, num_neurons=k), "cosine", {"reference_model": reference}, "global")
        assert chosen(mask) == set(expected[:k])


def test_reference_from_a_folder_and_mlp_units(tmp_path):
    model = make_model("llama")
    reference_with_known_changes(model, "llama").save_pretrained(tmp_path / "ref")
    mask = run_selector(context(model, num_neurons=3), "cosine", {"reference_model": str(tmp_path / "ref")}, "global")
    assert chosen(mask) == {(name, n) for name, _, n, _ in CHANGES["llama"]}
    assert mask.metadata["reference_model"] == str(tmp_path / "ref")
    kwargs = {"reference_model": str(tmp_path / "ref")}
    units = run_selector(context(model, unit="mlp", num_neurons=3), "cosine", kwargs, "global")
    assert {(name.rsplit(".", 2)[0], n) for name, n in chosen(units)} == {
        ("model.layers.0", 3), ("model.layers.1", 5), ("model.layers.1", 40)}


def test_reference_mismatches_are_clear_errors():
    model = make_model("llama")
    with pytest.raises(ValueError, match="has no module 'model.layers.0.mlp.up_proj'.*same architecture"):
        run_selector(context(model), "cosine", {"reference_model": make_model("gpt2")})
    with pytest.raises(ValueError, match="every candidate scored cosine 1.*reference model equals the original"):
        run_selector(context(model), "cosine", {"reference_model": copy.deepcopy(model)})
    with pytest.raises(ValueError, match="could not load reference_model='/no/such/folder'"):
        run_selector(context(model), "cosine", {"reference_model": "/no/such/folder"})
    with pytest.raises(ValueError, match="does not run when reference_model is given"):
        run_selector(context(model), "cosine", {"reference_model": model, "probe_steps": 3})


def test_probe_deltas_equal_a_real_fine_tune_of_the_candidate_projections():
    model = make_model("llama")
    texts = list(make_dataset(12)["text"])
    batches = [make_batches(texts[i:i + 4])[0] for i in range(0, 12, 4)]
    ctx = context(model, batches, num_neurons=10)
    probe = run_probe(ctx, steps=3, learning_rate=1e-3)

    tuned = copy.deepcopy(model)  # the paper's step 1 done directly: AdamW on the projections' own weights
    tuned.train().requires_grad_(False)
    weights = [dict(tuned.named_modules())[p.name].weight for p in build_neuron_map(tuned)]
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.AdamW(weights, lr=1e-3, weight_decay=0.0)
    for batch in batches:
        tuned(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    modules = dict(model.named_modules())
    for proj, w in zip(build_neuron_map(tuned), weights, strict=True):
        torch.testing.assert_close(probe.deltas[proj.name], w.detach() - modules[proj.name].weight, rtol=1e-3,
                                   atol=2e-6)
    assert probe.deltas["model.layers.0.mlp.up_proj"].abs().max() > 1e-4  # it did train
    # so the probe's selection is the selection against that fine-tuned model
    from_probe = run_selector(ctx, "cosine", {"probe": "full", "probe_steps": 3, "probe_learning_rate": 1e-3})
    from_reference = run_selector(context(model, num_neurons=10), "cosine", {"reference_model": tuned})
    assert from_probe == from_reference


@pytest.mark.parametrize(("train_mode", "probe"), [(True, "sketch"), (False, "sketch"), (True, "full")])
def test_probe_leaves_model_optimizer_and_rng_untouched(tmp_path, train_mode, probe):
    args = tiny_args(tmp_path, num_neurons=9, selector_kwargs={"probe_steps": 4, "probe": probe}, weight_decay=0.1,
                     gradient_accumulation_steps=2)
    trainer = NeFTSFTTrainer(make_model("gpt2"), make_dataset(), args=args, processing_class=make_tokenizer())
    model = trainer.model.train(train_mode)
    before = snapshot(model)
    rng = torch.get_rng_state()
    mask = trainer.select_neurons()
    assert_untouched(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training == train_mode for m in model.modules())
    assert trainer.optimizer is None and trainer.lr_scheduler is None
    meta = mask.metadata
    assert meta["probe_steps"] == "4" and float(meta["probe_learning_rate"]) == args.learning_rate
    full_probe_bytes = 16 * sum(p.module.weight.numel() for p in trainer.neuron_map)  # deltas, grads, 2 moments
    state = int(meta["probe_state_bytes"])
    assert meta["probe"] == probe and 0 < state and (state < full_probe_bytes) == (probe == "sketch")
    trainer.train()  # and the run itself proceeds normally on the selected neurons
    assert trainer.neuron_mask == mask


def test_default_probe_steps_is_a_twentieth_of_the_run_clamped_to_10_50():
    def run(max_steps, batches=40, accumulation=1, epochs=3.0):
        args = SimpleNamespace(max_steps=max_steps, gradient_accumulation_steps=accumulation, num_train_epochs=epochs)
        return SimpleNamespace(trainer=SimpleNamespace(args=args, get_train_dataloader=lambda: range(batches)))

    assert default_probe_steps(run(3)) == 10  # never the collapsed 1-step probe
    assert default_probe_steps(run(260)) == 13
    assert default_probe_steps(run(100_000)) == 50
    assert default_probe_steps(run(-1, batches=400, accumulation=2, epochs=3)) == 30  # 200 steps x 3 epochs
    assert default_probe_steps(SimpleNamespace(trainer=None, batches=[{}] * 7)) == 7  # one pass over a list
    assert default_probe_steps(SimpleNamespace(trainer=None, batches=lambda n: iter([]))) == 50


# -- quantized models (bitsandbytes on CPU) ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_data_driven_selectors_on_a_quantized_model_keep_its_weights(tiny_llama_path, quant):
    pytest.importorskip("bitsandbytes")
    config = BitsAndBytesConfig(load_in_4bit=True) if quant == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=config)
    batches = make_batches(list(make_dataset(4)["text"]))
    for selector, kwargs in [("cosine", {"probe_steps": 2, "probe_learning_rate": 1e-3}),
                             ("cosine", {"probe": "full", "probe_steps": 2, "probe_learning_rate": 1e-3}),
                             ("activation", {}), ("gradient", {"calibration_batches": 1})]:
        before = snapshot(model)
        mask = run_selector(context(model, batches, num_neurons=6), selector, kwargs)
        assert mask.num_selected == 6, selector
        for name, value in model.state_dict().items():
            assert value.dtype == before[0][name].dtype and torch.equal(value, before[0][name]), (selector, name)


@pytest.mark.parametrize("reentrant", [True, False])
def test_probe_under_activation_checkpointing_trains_the_same_deltas(reentrant):
    """Trainer.train() turns checkpointing on before selection; the delta hooks must survive the recompute."""
    model = make_model("llama")
    batches = [make_batches(list(make_dataset(8)["text"]))[0]] * 2
    plain = run_probe(context(model, batches), steps=2, learning_rate=1e-3).deltas
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})
    before = snapshot(model)
    checkpointed = run_probe(context(model, batches), steps=2, learning_rate=1e-3).deltas
    assert_untouched(model, before)
    for name, delta in plain.items():
        assert delta.abs().max() > 0
        torch.testing.assert_close(checkpointed[name], delta, rtol=1e-4, atol=1e-7)
