"""Attention neurons: which attention projections hold candidates, by layout (an option beside the MLP's).

NeFT's paper selects MLP neurons only. Related work (S2FT) selects attention heads and FFN channels
together, so ``neuron_targets=("mlp", "attention")`` also makes attention weight vectors candidates, with the
same meaning of "neuron" as in the MLP: row ``n`` of an input projection (``q``, ``k``, ``v``, or GPT-2's
fused ``qkv``: an "in" neuron, one output feature) or column ``n`` of the output projection (``o``: an "out"
neuron, one feature of the attention output). Everything downstream (selectors, hooks, deltas, 4-bit deltas,
masks, reports) works per projection, so an attention projection is just another ``Projection`` with its
own role.

A fused ``qkv`` projection (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) is one projection: its rows are
the q, k and v features side by side; a row is still one neuron.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .errors import UsageError
from .layers import is_supported_layer

#: Where neuron candidates may come from; the default is the paper's (MLP only).
TARGETS = ("mlp", "attention")
DEFAULT_TARGETS = ("mlp",)
#: Attention roles: input projections (rows are neurons) and the output projection (columns are neurons).
INPUT_ROLES = ("q", "k", "v", "qkv")
OUTPUT_ROLE = "o"
ROLES = (*INPUT_ROLES, OUTPUT_ROLE)

#: Known attention layouts: child names of the attention module per role.
ATTENTION_ARCHITECTURES: dict[str, dict[str, str]] = {
    "llama-style (Llama, Mistral, Qwen2, Gemma, SmolLM)": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
    "opt / bart": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"},
    "phi": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "dense"},
    "gpt2 (fused c_attn)": {"qkv": "c_attn", "o": "c_proj"},
    "gpt-neox / falcon / bloom (fused query_key_value)": {"qkv": "query_key_value", "o": "dense"},
}


def parse_targets(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``"mlp,attention"`` or ``["mlp", "attention"]`` -> ``("mlp", "attention")`` (model order); None: the default."""
    if value is None:
        return DEFAULT_TARGETS
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(item).strip() for item in items if str(item).strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise UsageError(f"neuron_targets={value!r}: give one or more of {TARGETS}, comma-separated "
                         "(e.g. 'mlp' for the paper's MLP neurons, 'mlp,attention' to add q/k/v rows and o columns).")
    return tuple(t for t in TARGETS if t in names)


def check_attention_layout(layout: Mapping[str, str]) -> None:
    """A custom ``attention_modules`` must name an output projection and either q, k and v or a fused qkv."""
    keys = set(layout)
    separate, fused = {"q", "k", "v", "o"}, {"qkv", "o"}
    if keys not in (separate, fused):
        raise UsageError(
            f"attention_modules={dict(layout)!r} must map 'q', 'k', 'v' and 'o' (or a fused 'qkv' and 'o') to the "
            'child names of the attention module, e.g. {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}.'
        )


def attention_layouts(attention_modules: Mapping[str, str] | None) -> list[dict[str, str]]:
    """The layouts to look for: the caller's one (checked), or every known layout."""
    if attention_modules:
        check_attention_layout(attention_modules)
        return [dict(attention_modules)]
    return [dict(layout) for layout in ATTENTION_ARCHITECTURES.values()]


def match_attention(module: nn.Module, layouts: list[dict[str, str]]) -> dict[str, str] | None:
    """The first layout whose every child is a supported linear layer of ``module``, else None."""
    for layout in layouts:
        if all(is_supported_layer(getattr(module, child, None)) for child in layout.values()):
            return layout
    return None


def ordered_roles(layout: Mapping[str, str]) -> list[str]:
    """The layout's roles in forward order: inputs first, the output projection last."""
    return [role for role in ROLES if role in layout]


def no_attention_error(model_type: str) -> UsageError:
    known = "; ".join(f"{arch}: {lay}" for arch, lay in ATTENTION_ARCHITECTURES.items())
    return UsageError(
        f"neuron_targets includes 'attention', but no attention projections were found in model type "
        f"{model_type!r}. Known layouts: {known}. Set `attention_modules` to the child names of your attention "
        'module (e.g. {"q": "wq", "k": "wk", "v": "wv", "o": "wo"}), or use neuron_targets="mlp".'
    )
