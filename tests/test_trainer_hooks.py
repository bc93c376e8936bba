"""NeFTSFTTrainer in hooks mode: only selected neurons move, bit for bit, whatever the optimizer does."""

import pytest
import torch
from conftest import ARCHITECTURES, make_dataset, make_model, make_tokenizer, tiny_args
from transformers import AutoModelForCausalLM
from trl import SFTConfig

from neft_trl import NeFTConfig, NeFTSFTTrainer, NeuronMask
from neft_trl.selection import preserved_rng_state


def _train(tmp_path, model, **overrides):
    args = tiny_args(tmp_path, **{"neft_mode": "hooks", **overrides})
    trainer = NeFTSFTTrainer(model, make_dataset(), selector="random", args=args, processing_class=make_tokenizer())
    trainer.train()
    return trainer


def _key_bias_rows(proj) -> torch.Tensor:
    """Rows whose bias gets no gradient: a key bias adds the same amount to every score of a query, which softmax
    ignores, so it cannot move (or moves by rounding noise only): the k rows of a k or a fused qkv projection.

    Fused layouts differ: GPT-2's ``c_attn`` stacks q, k, v blocks, GPT-NeoX's ``query_key_value`` interleaves them
    per head. Only the stacked one is known here; another fused layout fails loudly instead of exempting wrong rows.
    """
    rows = torch.zeros(proj.num_neurons, dtype=torch.bool)
    if proj.role == "k":
        rows[:] = True
    elif proj.role == "qkv":
        assert proj.name.endswith(".c_attn"), f"the k rows of {proj.name}'s fused layout are unknown to this helper"
        width = proj.num_neurons // 3
        rows[width:2 * width] = True
    return rows


def assert_only_selected_changed(trainer, before):
    """Every non-selected neuron and every non-MLP parameter is bit-identical; every selected neuron moved (its
    bias too, unless it is a key bias, which has no gradient)."""
    model, mask = trainer.model, trainer.neuron_mask
    mlp_params = set()
    for proj in trainer.neuron_map:
        selected = mask.selected[proj.name]
        weight, old = proj.module.weight.detach(), before[f"{proj.name}.weight"]
        other = 1 - proj.neuron_dim
        moved = (weight != old).any(dim=other)
        assert torch.equal(moved[~selected], torch.zeros_like(moved[~selected])), f"frozen neuron moved in {proj.name}"
        assert moved[selected].all(), f"a selected neuron of {proj.name} did not move"
        mlp_params.add(f"{proj.name}.weight")
        bias = getattr(proj.module, "bias", None)
        if bias is not None:
            mlp_params.add(f"{proj.name}.bias")
            bias_moved = bias.detach() != before[f"{proj.name}.bias"]
            if proj.trains_bias:
                assert not bias_moved[~selected].any(), f"a frozen neuron's bias moved in {proj.name}"
                can_move = selected & ~_key_bias_rows(proj)
                assert bias_moved[can_move].all(), f"a selected neuron's bias of {proj.name} did not move"
            else:
                assert not bias_moved.any(), "the output projection's shared bias must stay frozen"
    for name, param in model.named_parameters():
        if name not in mlp_params:
            assert torch.equal(param.detach(), before[name]), f"{name} changed"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_frozen_neurons_bit_identical_with_decay_clipping_accumulation(tmp_path, arch):
    model = make_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _train(tmp_path, model, weight_decay=0.1, max_grad_norm=0.5, gradient_accumulation_steps=2,
                     neuron_ratio=0.2)
    units = sum(int(trainer.neuron_mask.selected[g.projections[0].name].sum()) for g in trainer.neuron_map.groups)
    assert units == round(0.2 * trainer.neuron_map.num_candidates)  # the default unit: one MLP channel
    assert_only_selected_changed(trainer, before)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(group["weight_decay"] == 0 for group in trainer.optimizer.param_groups if group["params"])


def test_mlp_unit_and_gate_bit_identical(tmp_path):
    model = make_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _train(tmp_path, model, weight_decay=0.1, neuron_unit="mlp", include_gate=True, num_neurons=10)
    mask = trainer.neuron_mask
    assert mask.num_selected == 10 * 3  # 10 tied units x (up, gate, down)
    for layer in (0, 1):
        up, gate, down = (mask.selected[f"model.layers.{layer}.mlp.{p}_proj"] for p in ("up", "gate", "down"))
        assert torch.equal(up, gate) and torch.equal(up, down)
    assert_only_selected_changed(trainer, before)


def test_bf16_autocast_and_gradient_checkpointing(tmp_path):
    model = make_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _train(tmp_path, model, bf16=True, gradient_checkpointing=True, weight_decay=0.1, neuron_ratio=0.3)
    assert_only_selected_changed(trainer, before)


def test_weight_decay_applies_to_selected_neurons_like_adamw(tmp_path):
    """Decay must still shrink the selected neurons (applied by neft_trl, not the optimizer) and never the rest."""
    runs = {}
    for wd in (0.0, 0.5):
        model = make_model("llama")
        trainer = _train(tmp_path / str(wd), model, weight_decay=wd, neuron_ratio=0.3, max_steps=2)
        runs[wd] = trainer
    proj = runs[0.0].neuron_map.projections[0]
    w0 = runs[0.0].model.get_submodule(proj.name).weight
    w1 = runs[0.5].model.get_submodule(proj.name).weight
    selected = runs[0.0].neuron_mask.selected[proj.name]
    assert not torch.equal(w0[selected], w1[selected]), "weight decay must shrink the selected neurons"
    assert torch.equal(w0[~selected], w1[~selected])


def test_exact_call_form_and_model_path(tmp_path, monkeypatch):
    folder = tmp_path / "tiny"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    trainer = NeFTSFTTrainer(model, make_dataset(), selector="random")
    assert trainer.args.selector == "random" and trainer.args.output_dir.endswith("tiny-NeFT")
    from_path = NeFTSFTTrainer(str(folder), make_dataset(), selector="random", args=tiny_args(tmp_path))
    assert from_path.neuron_map.num_layers == 2


def test_save_model_writes_a_loadable_checkpoint_and_the_mask(tmp_path):
    model = make_model("llama")
    trainer = _train(tmp_path, model, neuron_ratio=0.1)
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    mask = NeuronMask.load(out / "neuron_mask.safetensors")
    assert mask == trainer.neuron_mask and mask.metadata["selector"] == "random"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, p), (_, q) in zip(model.named_parameters(), reloaded.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    # train again from the saved mask: the same neurons, no selection
    again = _train(tmp_path / "again", make_model("llama"), neuron_mask_path=str(out))
    assert again.neuron_mask == mask


def test_resume_gives_the_same_mask_and_weights(tmp_path):
    full = _train(tmp_path / "full", make_model("llama"), max_steps=4, neuron_ratio=0.2, weight_decay=0.1)
    first = _train(tmp_path / "part", make_model("llama"), max_steps=4, neuron_ratio=0.2, weight_decay=0.1,
                   save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "part" / "out" / "checkpoint-2"
    assert (checkpoint / "neuron_mask.safetensors").is_file()
    # a different budget: were the mask selected again instead of loaded from the checkpoint, it would differ
    args = tiny_args(tmp_path / "part", max_steps=4, neuron_ratio=0.5, weight_decay=0.1, neft_mode="hooks")
    resumed = NeFTSFTTrainer(make_model("llama", seed=99), make_dataset(), selector="random", args=args,
                             processing_class=make_tokenizer())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.neuron_mask == first.neuron_mask == full.neuron_mask
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_selection_is_deterministic_from_the_seed(tmp_path):
    a = _train(tmp_path / "a", make_model("llama"), max_steps=1, neuron_ratio=0.2, seed=7).neuron_mask
    b = _train(tmp_path / "b", make_model("llama"), max_steps=1, neuron_ratio=0.2, seed=7).neuron_mask
    c = _train(tmp_path / "c", make_model("llama"), max_steps=1, neuron_ratio=0.2, seed=8).neuron_mask
    assert a == b and a != c


def test_selection_leaves_rng_untouched():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    with preserved_rng_state():
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_plain_sft_config_gets_neft_defaults(tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, learning_rate=3e-3)
    trainer = NeFTSFTTrainer(make_model("llama"), make_dataset(), selector="random", args=args,
                             processing_class=make_tokenizer())
    assert isinstance(trainer.args, NeFTConfig)
    assert trainer.args.learning_rate == 3e-3 and trainer.args.budget.param_ratio == 0.06


def test_bad_inputs(tmp_path):
    model, ds, tok = make_model("llama"), make_dataset(), make_tokenizer()
    with pytest.raises(TypeError, match="second positional argument is train_dataset"):
        NeFTSFTTrainer(model, tiny_args(tmp_path))
    with pytest.raises(ValueError, match="Unknown neuron selector 'nope'. Installed selectors: .*random"):
        NeFTSFTTrainer(model, ds, selector="nope", args=tiny_args(tmp_path), processing_class=tok)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_args(tmp_path, param_ratio=0.1, neuron_ratio=0.1)
    with pytest.raises(ValueError, match="neft_mode"):
        tiny_args(tmp_path, neft_mode="lora")
    with pytest.raises(ValueError, match="remove peft_config"):
        NeFTSFTTrainer(model, ds, selector="random", args=tiny_args(tmp_path), peft_config=object())
    # at construction, not after hours; the message says what one candidate is under the default unit
    with pytest.raises(ValueError, match=r"exceeds the 96 candidate neurons .*index n of up\+down taken"):
        NeFTSFTTrainer(model, ds, selector="random", args=tiny_args(tmp_path, num_neurons=10_000), processing_class=tok)


def test_selector_argument_leaves_the_callers_config_alone(tmp_path):
    args = tiny_args(tmp_path)
    trainer = NeFTSFTTrainer(make_model("llama"), make_dataset(), selector="random", args=args,
                             processing_class=make_tokenizer())
    assert trainer.args.selector == "random" and args.selector == "cosine"


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0], ids=["no-clipping", "clipping"])
def test_an_inf_in_a_frozen_rows_gradient_never_reaches_the_weights(tmp_path, max_grad_norm):
    """The mask zeroes frozen gradients exactly: ``inf * 0`` would be NaN, and clipping would spread it."""
    model = make_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    up = model.model.layers[0].mlp.up_proj.weight
    args = tiny_args(tmp_path, max_steps=2, neuron_ratio=0.3, weight_decay=0.1, max_grad_norm=max_grad_norm,
                     neft_mode="hooks")
    trainer = NeFTSFTTrainer(model, make_dataset(), selector="random", args=args, processing_class=make_tokenizer())
    injected = []

    def inject_inf(grad):  # registered before NeFT's own hook, so it runs first: the raw gradient holds inf
        frozen = ~trainer.neuron_mask.selected["model.layers.0.mlp.up_proj"]
        grad = grad.clone()
        grad[frozen] = float("inf")
        injected.append(int(frozen.sum()))
        return grad

    up.register_hook(inject_inf)
    trainer.train()
    assert injected and injected[0] > 0
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), f"non-finite values in {name}"
    assert_only_selected_changed(trainer, before)


@pytest.mark.parametrize("mode", ["hooks", "delta"])
def test_resuming_from_a_checkpoint_without_a_mask_is_an_error_naming_the_fix(tmp_path, mode):
    """A plain SFTTrainer checkpoint holds no mask: selecting anew on its trained weights would be silent and wrong."""
    from trl import SFTTrainer

    from neft_trl.errors import MissingFileError

    sft_args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, save_strategy="steps", save_steps=1,
                         report_to=[], use_cpu=True, max_length=32, per_device_train_batch_size=4, bf16=False,
                         disable_tqdm=True)
    SFTTrainer(make_model("llama"), args=sft_args, train_dataset=make_dataset(),
               processing_class=make_tokenizer()).train()
    checkpoint = tmp_path / "sft" / "checkpoint-1"
    assert (checkpoint / "optimizer.pt").is_file() and not (checkpoint / "neuron_mask.safetensors").exists()
    trainer = NeFTSFTTrainer(make_model("llama"), make_dataset(), selector="random",
                             args=tiny_args(tmp_path, max_steps=2, neft_mode=mode), processing_class=make_tokenizer())
    with pytest.raises(MissingFileError, match=r"Cannot resume from .*checkpoint-1.* holds no "
                                               r"neuron_mask.safetensors.*neuron_mask_path=") as err:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert "start a new run from its weights" in str(err.value)
    assert trainer.neuron_mask is None  # nothing was selected


def test_the_mask_is_written_before_the_weights(tmp_path, monkeypatch):
    """A save that dies while writing the weights still leaves the mask, so the checkpoint stays resumable."""
    trainer = _train(tmp_path, make_model("llama"), max_steps=1, neuron_ratio=0.2)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(trainer.model, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_model(str(tmp_path / "saved"))
    assert NeuronMask.load(tmp_path / "saved") == trainer.neuron_mask
