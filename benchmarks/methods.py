"""The methods the benchmark compares, by name, and the LoRA rank that matches a NeFT budget.

A method name says everything that differs between runs, so the driver can pass it on a command line:

* ``base`` / ``qbase``: the untouched model (fp32 / 4-bit nf4), for the "before" numbers;
* ``full``: plain ``trl.SFTTrainer``, every parameter trains;
* ``lora`` / ``qlora``: PEFT LoRA on all linear layers (QLoRA: on the 4-bit nf4 model);
* ``neft-hooks-<selector>`` / ``neft-delta-<selector>``: ``NeFTSFTTrainer`` in that mode with that selector;
* ``qneft-delta-<selector>``: NeFT deltas on the 4-bit nf4 model.

Equal trainable parameters: the NeFT budget fixes how many parameters NeFT trains; the LoRA rank is then the
one whose adapter size is closest (``lora_rank_for``), computed from the model's own linear layers the way
PEFT's ``target_modules="all-linear"`` picks them (every linear layer but the output head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neft_trl.budget import Budget, select_top
from neft_trl.layers import features, is_supported_layer, parameter_count
from neft_trl.neurons import build_neuron_map

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
            return f"{'q' if self.quantized else ''}neft-delta-{self.selector}"
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
        return Method(name, "neft", quantized=quantized, mode=parts[1], selector=parts[2])
    raise ValueError(
        f"Unknown benchmark method {name!r}. Use one of: {', '.join(simple)}, neft-hooks-<selector>, "
        "neft-delta-<selector>, qneft-delta-<selector> (selector: cosine, gradient, activation, random, ...)."
    )


def default_methods(selectors: list[str], quantized_selector: str = "cosine") -> list[str]:
    """The full comparison: full FT, LoRA, NeFT hooks and delta per selector, 4-bit NeFT vs QLoRA."""
    names = ["full", "lora"]
    names += [f"neft-{mode}-{s}" for s in selectors for mode in MODES]
    return names + [f"qneft-delta-{quantized_selector}", "qlora"]


def lora_parameters_per_rank(model: nn.Module) -> int:
    """Trainable parameters a rank-1 LoRA adds on all linear layers: ``sum(in + out)``, output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = 0
    for module in model.modules():
        if module is head or not is_supported_layer(module):
            continue
        in_features, out_features = features(module)
        total += in_features + out_features
    if total == 0:
        raise ValueError(f"{type(model).__name__} has no linear layers besides its output head: LoRA has no target.")
    return total


def neft_trainable_parameters(
    model: nn.Module, budget: Budget, unit: str = "vector", include_gate: bool = False
) -> int:
    """Parameters NeFT trains under ``budget``, whatever the selector: the core's own ranking on constant scores.

    Every selector keeps the same *number* of neurons for a budget (it only changes which), so ranking
    constant scores with ``select_top`` gives the count without running a selector.
    """
    neuron_map = build_neuron_map(model, unit, include_gate)
    flat = {g.key: torch.zeros(g.size) for g in neuron_map.groups}
    return select_top(neuron_map, flat, budget, parameter_count(model)).trainable_parameters


def lora_rank_for(model: nn.Module, trainable_parameters: int) -> int:
    """The LoRA rank whose all-linear adapter is closest in size to ``trainable_parameters`` (at least 1)."""
    return max(1, round(trainable_parameters / lora_parameters_per_rank(model)))
