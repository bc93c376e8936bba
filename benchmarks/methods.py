"""The methods the benchmark compares, by name, and the LoRA rank that matches a NeFT budget.

A method name says everything that differs between runs, so the driver can pass it on a command line:

* ``base`` / ``qbase``: the untouched model (fp32 / 4-bit nf4), for the "before" numbers;
* ``full``: plain ``trl.SFTTrainer``, every parameter trains;
* ``lora`` / ``qlora``: PEFT LoRA on all linear layers (QLoRA: on the 4-bit nf4 model);
* ``neft-hooks-<selector>`` / ``neft-delta-<selector>``: ``NeFTSFTTrainer`` in that mode with that selector;
* ``qneft-delta-<selector>``: NeFT deltas on the 4-bit nf4 model;
* ``...-<selector>+<variant>+...``: an ablation of that NeFT method (``variants.py``), e.g.
  ``neft-delta-cosine+probe20`` or ``qneft-delta-random+attn``.

Equal trainable parameters: the NeFT budget fixes how many parameters NeFT trains; the LoRA rank is then the
one whose adapter size is closest (``lora_rank_for``), computed from the model's own linear layers the way
PEFT's ``target_modules="all-linear"`` picks them (every linear layer but the output head).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from neft_trl.budget import Budget
from neft_trl.estimate import lora_parameters_per_rank, lora_rank_for  # noqa: F401  (re-exported for the driver)
from neft_trl.estimate import neft_trainable_parameters as _neft_trainable
from neft_trl.layers import parameter_count
from neft_trl.neurons import DEFAULT_NEURON_UNIT, build_neuron_map

from .variants import check_variant

FAMILIES = ("base", "full", "lora", "neft")
MODES = ("hooks", "delta")


@dataclass(frozen=True)
class Method:
    """One benchmarked way of fine-tuning (or not: ``family == "base"``)."""

    name: str
    family: str
    quantized: bool = False
    mode: str | None = None
    selector: str | None = None
    variants: tuple[str, ...] = ()

    @property
    def reference(self) -> str:
        """The row this method's step time and memory are divided by: LoRA at the same precision."""
        return "qlora" if self.quantized else "lora"

    @property
    def sweep_key(self) -> str:
        """Methods that train identical weights share one learning-rate sweep.

        Hooks and delta mode train the same weights (weight decay 0; tests/test_delta.py checks it), so the
        hooks row reuses its selector's delta sweep instead of repeating it: only their speed differs.
        """
        if self.family == "neft" and self.mode == "hooks":
            return f"{'q' if self.quantized else ''}neft-delta-{'+'.join((self.selector or '', *self.variants))}"
        return self.name


def parse_method(name: str) -> Method:
    """``"neft-delta-cosine"`` -> ``Method(...)``; an unknown name lists the valid forms."""
    simple = {"base": Method("base", "base"), "qbase": Method("qbase", "base", quantized=True),
              "full": Method("full", "full"), "lora": Method("lora", "lora"),
              "qlora": Method("qlora", "lora", quantized=True)}
    if name in simple:
        return simple[name]
    parts = name.split("-", 2)
    if len(parts) == 3 and parts[0] in ("neft", "qneft") and parts[1] in MODES and parts[2]:
        quantized = parts[0] == "qneft"
        if quantized and parts[1] == "hooks":
            raise ValueError(f"{name!r}: a 4-bit model trains through deltas only; use 'qneft-delta-{parts[2]}'.")
        selector, *variants = parts[2].split("+")
        for variant in variants:
            check_variant(variant, selector)
        return Method(name, "neft", quantized=quantized, mode=parts[1], selector=selector, variants=tuple(variants))
    raise ValueError(
        f"Unknown benchmark method {name!r}. Use one of: {', '.join(simple)}, neft-hooks-<selector>, "
        "neft-delta-<selector>, qneft-delta-<selector> (selector: cosine, gradient, activation, random, ...), "
        "each optionally with +<variant> ablations (benchmarks/variants.py)."
    )


def default_methods(selectors: list[str], quantized_selector: str = "cosine") -> list[str]:
    """The full comparison: full FT, LoRA, NeFT hooks and delta per selector, 4-bit NeFT vs QLoRA."""
    names = ["full", "lora"]
    names += [f"neft-{mode}-{s}" for s in selectors for mode in MODES]
    return names + [f"qneft-delta-{quantized_selector}", "qlora"]


def ablation_methods(installed_selectors: list[str]) -> list[str]:
    """The ablation study at equal trainable parameters: full FT and LoRA, then one NeFT change per row.

    Cosine probe length (1%, 5%, 20% of the run, and the default), full vs sketch probe, gradient taylor vs
    norm, activation, random, the ``magnitude`` plugin where installed, ``neuron_unit`` vector (the paper), whole
    SwiGLU channels (gate rows too), one global pool (the paper) and per-role shares instead of per-layer ones,
    attention neurons (with cosine and random selection), and no protection (the paper), 1% or 5% instead of 3%.
    """
    names = ["full", "lora", "neft-delta-cosine", "neft-delta-cosine+probe1", "neft-delta-cosine+probe5",
             "neft-delta-cosine+probe20", "neft-delta-cosine+fullprobe", "neft-delta-gradient",
             "neft-delta-gradient+norm", "neft-delta-activation", "neft-delta-random"]
    if "magnitude" in installed_selectors:
        names.append("neft-delta-magnitude")
    return names + ["neft-delta-cosine+vectorunit", "neft-delta-cosine+gate", "neft-delta-cosine+global",
                    "neft-delta-cosine+perrole", "neft-delta-cosine+attn", "neft-delta-random+attn",
                    "neft-delta-cosine+protect0", "neft-delta-cosine+protect1", "neft-delta-cosine+protect5"]


def neft_trainable_parameters(
    model: nn.Module, budget: Budget, unit: str = DEFAULT_NEURON_UNIT, include_gate: bool = False
) -> int:
    """Parameters NeFT trains under ``budget``, whatever the selector (see ``neft_trl.estimate``)."""
    return _neft_trainable(build_neuron_map(model, unit, include_gate), budget, parameter_count(model))
