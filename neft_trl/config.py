"""``NeFTConfig``: TRL's ``SFTConfig`` plus the neuron-level fine-tuning settings.

A dataclass like its parent, every field documented in ``metadata["help"]``, so that
``HfArgumentParser(NeFTConfig)`` gives a command line and the help text for free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils import is_torch_bf16_gpu_available
from trl import SFTConfig

from .attention import parse_targets
from .budget import DEFAULT_NEURON_SCOPE, SCOPES, Budget
from .errors import UsageError
from .neurons import DEFAULT_NEURON_UNIT, UNITS
from .protection import DEFAULT_PROTECT_RATIO, check_protect_ratio

MODES = ("auto", "hooks", "delta")


@dataclass
class NeFTConfig(SFTConfig):
    """Configuration for ``NeFTSFTTrainer``: every ``SFTConfig`` field, plus which neurons to train and how."""

    selector: str = field(
        default="cosine",
        metadata={"help": "Neuron selector plugin: cosine (the paper), activation, gradient, random, or any installed "
                          "third-party selector (entry-point group neft_trl.selectors)."},
    )
    selector_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for the selector, as a dict or a JSON string, e.g. "
                          '\'{"probe_steps": 20}\' for cosine or \'{"calibration_batches": 8}\' for activation.'},
    )
    param_ratio: float | None = field(
        default=None,
        metadata={"help": "Budget as a share of ALL model parameters, as in the paper (0.06 = NeFT 6 percent). "
                          "The default (0.06) applies when no budget is set. Set only one of param_ratio, neuron_ratio "
                          "and num_neurons."},
    )
    neuron_ratio: float | None = field(
        default=None, metadata={"help": "Budget as a share of the candidate neurons (0.1 = a tenth of them)."}
    )
    num_neurons: int | None = field(
        default=None, metadata={"help": "Budget as a number of candidates (with neuron_unit='mlp': MLP channels)."}
    )
    neuron_unit: str = field(
        default=DEFAULT_NEURON_UNIT,
        metadata={"help": "What one candidate is. 'mlp' (the default): row n of up/gate and column n of down form "
                          "one unit, the MLP's channel n. 'vector' (the paper): each up_proj row and each down_proj "
                          "column is ranked on its own."},
    )
    neuron_scope: str = field(
        default=DEFAULT_NEURON_SCOPE,
        metadata={"help": "'per_layer' (the default): keep the same share of candidates in every layer. 'global' "
                          "(the paper): rank all layers' candidates together. 'per_role': the same share of every "
                          "projection role (up, down, q, o, ...), pooled over layers. 'per_expert' (MoE models): the "
                          "same share in every routed expert of every layer."},
    )
    neuron_targets: str = field(
        default="mlp",
        metadata={"help": "Where candidates come from, comma-separated: 'mlp' (the paper) and/or 'attention' (rows "
                          "of q/k/v, columns of o, as in S2FT), e.g. 'mlp,attention'."},
    )
    include_gate: bool = field(
        default=False,
        metadata={"help": "Also make gate_proj rows candidates (the paper left gate out only for a framework limit)."},
    )
    neuron_modules: dict[str, str] | str | None = field(
        default=None,
        metadata={"help": "Child names of the MLP projections for architectures neft_trl does not know, as a dict "
                          'or JSON string: {"up": "w1", "gate": "w3", "down": "w2"}.'},
    )
    protect_ratio: float = field(
        default=DEFAULT_PROTECT_RATIO,
        metadata={"help": "Share of each layer's candidates that are never selected: the most active ones on the "
                          "training data (mean |activation|), which general text relies on too. Training them costs "
                          "the most forgetting (README 'Results'). 0 protects nothing."},
    )
    neft_mode: str = field(
        default="auto",
        metadata={"help": "'hooks': train the selected rows/columns of the original weights through gradient hooks "
                          "(full precision). 'delta': train small per-neuron deltas beside frozen weights (required "
                          "for 4/8-bit models; saves the deltas and, in full precision, a merged checkpoint). "
                          "'auto': delta (measured cheaper in memory and step time at 1B scale)."},
    )
    attention_modules: dict[str, str] | str | None = field(
        default=None,
        metadata={"help": "Child names of the attention projections for layouts neft_trl does not know, as a dict or "
                          'JSON string: {"q": "wq", "k": "wk", "v": "wv", "o": "wo"} (or a fused "qkv" and "o").'},
    )
    neuron_mask_path: str | None = field(
        default=None,
        metadata={"help": "Train with a saved neuron_mask.safetensors (or a folder holding one) instead of "
                          "selecting neurons."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            # TRL defaults to bf16, which fails on machines without a bf16 accelerator; NeFT's default works anywhere.
            self.bf16 = is_torch_bf16_gpu_available()
        super().__post_init__()
        for name in ("selector_kwargs", "neuron_modules", "attention_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as err:
                    raise UsageError(f"{name} must be a dict or a JSON object string, got {value!r}.") from err
        self.selector_kwargs = dict(self.selector_kwargs or {})
        _check_choice("neuron_unit", self.neuron_unit, UNITS)
        _check_choice("neuron_scope", self.neuron_scope, SCOPES)
        _check_choice("neft_mode", self.neft_mode, MODES)
        self.protect_ratio = check_protect_ratio(self.protect_ratio)
        self.neuron_targets = ",".join(parse_targets(self.neuron_targets))
        _ = self.budget  # validates the budget now, not at train time

    @property
    def targets(self) -> tuple[str, ...]:
        """``neuron_targets`` as a tuple, e.g. ``("mlp", "attention")``."""
        return parse_targets(self.neuron_targets)

    @property
    def budget(self) -> Budget:
        return Budget.resolve(self.param_ratio, self.neuron_ratio, self.num_neurons)

    @classmethod
    def from_training_args(cls, args: Any) -> NeFTConfig:
        """A ``NeFTConfig`` with NeFT defaults and every field that a plain ``SFTConfig``/``TrainingArguments`` set."""
        # Read the fields themselves: `to_dict()` masks every `*_token` value (hub_token, but also eos/pad_token).
        ours = {f.name for f in fields(cls) if f.init}
        return cls(**{f.name: getattr(args, f.name) for f in fields(args) if f.init and f.name in ours})


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name}={value!r} is not one of {choices}.")
