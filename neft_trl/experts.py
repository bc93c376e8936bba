"""Neurons inside the routed experts of mixture-of-experts models, and the interface selectors observe them by.

transformers 5 stores a MoE layer's routed experts fused, as 3-D parameters of one module (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, ...): ``gate_up_proj [E, 2I, H]`` (gate rows ``0..I-1``, then up rows) and
``down_proj [E, H, I]``. There is no ``nn.Linear`` per expert, so nothing for a hook to observe and no
weight of one expert to train. This module gives each expert's up, gate and down projection a small
**expert view** (``ExpertProjection``): a stateless module that acts as that expert's linear layer,
``y = x W[e]^T`` with ``W[e]`` a *view* into the fused parameter (so writing it writes the model).

``install_expert_views`` adds the views under the experts module (``<experts>.neft_experts.<e>.{up,gate,down}``)
and makes the experts module compute through them: for each expert, only the tokens routed to it pass
through its views, with the same arithmetic as transformers' eager experts loop
(``down(act(gate(x)) * up(x)) * routing_weight``, summed over the top-k experts). From then on:

- every hook on a view sees exactly the routed tokens of one expert: forward hooks give the inputs and
  outputs, tensor hooks on them the gradients; ``view.token_index`` holds the positions of those tokens in
  the flattened ``[batch * seq]`` hidden states of the current call (to drop padding with the attention mask);
  an expert that receives no token is not called at all;
- a view is a ``Projection.module`` like an ``nn.Linear`` (``in_features``, ``out_features``, ``weight``), so
  the neuron map, the selectors, the cosine probe and neuron deltas work on it unchanged;
- the router is never a candidate and never trains.

The views hold no parameters or buffers, so ``state_dict``/``save_pretrained`` are unchanged. Only the
layout transformers' ``use_experts_implementation`` defaults to is supported (gate and up concatenated, not
transposed, no bias, default gating); any other is an error that names the flags.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

VIEWS_ATTRIBUTE = "neft_experts"
ROLES = ("up", "gate", "down")
#: ``use_experts_implementation`` flags of the one fused layout the views implement, and their required values.
_SUPPORTED_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                    "has_post_expert_norm": False}


class ExpertProjection(nn.Module):
    """One role (``up``, ``gate`` or ``down``) of one routed expert, as a linear layer over the fused weight.

    ``weight`` is ``[out, in]``: a view of rows ``rows`` of ``<parameter>[expert]``. The experts module is
    kept in a list so that it is not registered as a child (the view lives *inside* it).
    """

    def __init__(self, experts: nn.Module, parameter: str, expert: int, role: str, rows: slice):
        super().__init__()
        self._experts = [experts]
        self.parameter_name = parameter
        self.expert = expert
        self.role = role
        self.rows = rows
        self.out_features, self.in_features = self.weight.shape
        self.token_index: torch.Tensor | None = None

    @property
    def fused_parameter(self) -> nn.Parameter:
        return getattr(self._experts[0], self.parameter_name)

    @property
    def weight(self) -> torch.Tensor:
        return self.fused_parameter[self.expert, self.rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def mark(self, keep: torch.Tensor, selected: torch.Tensor) -> None:
        """Set this view's selected neurons in ``keep``, a bool mask that broadcasts to the fused parameter.

        ``keep`` is ``[E, rows, 1]`` for ``gate_up_proj`` (in-neurons are rows) and ``[E, 1, I]`` for
        ``down_proj`` (out-neurons are columns).
        """
        if self.role == "down":
            keep[self.expert, 0, :] |= selected.to(keep.device)
        else:
            keep[self.expert, self.rows, 0] |= selected.to(keep.device)

    def extra_repr(self) -> str:
        return (f"expert={self.expert}, role={self.role}, in_features={self.in_features}, "
                f"out_features={self.out_features}")


def is_expert_view(module: nn.Module) -> bool:
    return isinstance(module, ExpertProjection)


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding routed experts as 3-D parameters ``gate_up_proj``/``up_proj`` and ``down_proj``."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return all(isinstance(p, nn.Parameter) and p.ndim == 3 for p in (down, up))


def check_supported(name: str, experts: nn.Module) -> None:
    """One error naming every flag of an experts layout the views do not implement."""
    wrong = {flag: getattr(experts, flag) for flag, value in _SUPPORTED_FLAGS.items()
             if getattr(experts, flag, value) != value}
    gate = getattr(type(experts), "_apply_gate", None)
    custom_gate = gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate"
    if wrong or custom_gate or not hasattr(experts, "gate_up_proj") or not hasattr(experts, "act_fn"):
        found = {**wrong, **({"_apply_gate": "custom"} if custom_gate else {})}
        raise ValueError(
            f"The routed experts {name!r} ({type(experts).__name__}) use a fused layout NeFT cannot train "
            f"({found or 'no gate_up_proj/act_fn'}); NeFT supports gate_up_proj [E, 2I, H] + down_proj [E, H, I] with "
            "has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True and the default gating. "
            "Leaving these experts out would silently train only part of the MLP: convert the experts to that "
            "layout, or fine-tune this model type another way."
        )


class ExpertViews(nn.ModuleList):
    """``neft_experts.<e>.{up,gate,down}``: the views of every expert of one fused experts module."""

    def __init__(self, experts: nn.Module):
        num_experts, rows, _ = experts.gate_up_proj.shape
        inter = rows // 2  # concatenated layout: gate rows first, then up rows (transformers' chunk(2))
        spans = {"gate": ("gate_up_proj", slice(0, inter)), "up": ("gate_up_proj", slice(inter, rows)),
                 "down": ("down_proj", slice(None))}
        super().__init__(
            nn.ModuleDict({role: ExpertProjection(experts, spans[role][0], e, role, spans[role][1]) for role in ROLES})
            for e in range(num_experts)
        )


def _routed_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop, computed through the expert views (bound as ``experts.forward``)."""
    views: ExpertViews = getattr(self, VIEWS_ATTRIBUTE)
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        hit = torch.bincount(top_k_index.reshape(-1), minlength=len(views))[: len(views)].nonzero().flatten()
    for expert in hit.tolist():
        token_idx, top_k_pos = torch.where(top_k_index == expert)
        view = views[expert]
        for role in ROLES:
            view[role].token_index = token_idx
        x = hidden_states[token_idx]
        out = view["down"](self.act_fn(view["gate"](x)) * view["up"](x))
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def check_experts_quantized(model: nn.Module, fused: dict[str, nn.Module]) -> None:
    """A bitsandbytes model whose fused experts bitsandbytes left in full precision is an error, not a 4-bit run.

    bitsandbytes quantizes ``nn.Linear`` layers only; fused 3-D experts (most of an MoE model's weights) stay
    in their load dtype, so "4-bit" NeFT would silently run with full-precision experts.
    """
    from .layers import is_quantized_model, parameter_count

    if not fused or not is_quantized_model(model):
        return
    params = [(f"{name}.{p}", getattr(module, p)) for name, module in fused.items()
              for p in ("gate_up_proj", "down_proj")]
    count, share = sum(p.numel() for _, p in params), sum(p.numel() for _, p in params) / parameter_count(model)
    raise ValueError(
        f"bitsandbytes quantized only the nn.Linear layers of this model: its routed experts ({params[0][0]}, ... "
        f"{len(params)} fused 3-D weights, {count:,} parameters = {share:.0%} of the model) stay "
        f"{params[0][1].dtype}, so a 4/8-bit NeFT run would not quantize them. Load the model without "
        "quantization_config (in bf16 or fp32) and train with neft_mode='delta' (frozen base, per-neuron deltas) or "
        "'hooks'."
    )


def install_expert_views(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Give every fused experts module of ``model`` its views and route its forward through them (idempotent).

    Returns ``(name, experts module)`` for every fused experts module, in model order.
    """
    found = []
    for name, module in model.named_modules():
        if not is_fused_experts(module):
            continue
        check_supported(name, module)
        if not isinstance(getattr(module, VIEWS_ATTRIBUTE, None), ExpertViews):
            module.add_module(VIEWS_ATTRIBUTE, ExpertViews(module))
            module.forward = types.MethodType(_routed_forward, module)
        found.append((name, module))
    return found


def expert_views(name: str, experts: nn.Module, include_gate: bool) -> Iterator[tuple[str, ExpertProjection]]:
    """``(module name, view)`` of every candidate projection of an installed experts module, expert by expert."""
    roles = ("up", "gate", "down") if include_gate else ("up", "down")
    views: ExpertViews = getattr(experts, VIEWS_ATTRIBUTE)
    for expert in range(len(views)):
        for role in roles:
            yield f"{name}.{VIEWS_ATTRIBUTE}.{expert}.{role}", views[expert][role]


def fused_gradient_targets(projections, selected: dict[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(fused parameter, keep mask)`` for hooks mode: one combined mask per 3-D parameter with selected neurons.

    Several views share one parameter (every expert, and up/gate share ``gate_up_proj``), so their choices
    are OR-ed into one mask that broadcasts to the parameter; one gradient hook then zeroes everything else.
    """
    keeps: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for proj in projections:
        view = proj.module
        if not is_expert_view(view) or not selected[proj.name].any():
            continue
        param = view.fused_parameter
        if id(param) not in keeps:
            shape = (param.shape[0], 1, param.shape[2]) if view.role == "down" else (*param.shape[:2], 1)
            keeps[id(param)] = (param, torch.zeros(shape, dtype=torch.bool))
        view.mark(keeps[id(param)][1], selected[proj.name])
    return list(keeps.values())
