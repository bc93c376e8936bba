"""Neuron deltas of a ``hooks``-mode run: the trained model minus its base, on the selected neurons only.

A hooks run saves a full checkpoint in which only the mask's neurons moved (its gradient hooks guarantee
that every other weight is bit-identical to the base). Taking ``trained - base`` on those neurons gives the
same ``NeuronDelta`` objects a ``delta``-mode run trains, so every consumer of deltas (merge, load, the PEFT
export) serves both modes. Because the claim "only these neurons moved" is what makes the result exact, it
is checked here: any other difference (another base model, a different dtype, a run that trained more than
its mask) is an error naming the tensors, never a silently wrong delta.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..layers import dense_weight, is_quantized_model
from ..mask import NeuronMask
from ..neurons import Projection, neuron_vectors
from .delta_layer import NeuronDelta


def deltas_from_models(trained: nn.Module, base: nn.Module, mask: NeuronMask) -> dict[str, NeuronDelta]:
    """``trained - base`` (fp32) on the mask's neurons, per projection with selected neurons.

    Raises one ValueError naming up to four tensors when the models differ anywhere else (or in shape, or
    in which tensors they hold).
    """
    for model, role in ((trained, "trained"), (base, "base")):
        if is_quantized_model(model):
            raise ValueError(
                f"The {role} model is quantized: a hooks run trains full-precision weights, so both the checkpoint "
                "and its base must be loaded in full precision to take their difference."
            )
    trained_state, base_state = trained.state_dict(), base.state_dict()
    problems = _key_problems(trained_state, base_state)
    modules = dict(trained.named_modules())
    base_modules = dict(base.named_modules())
    deltas: dict[str, NeuronDelta] = {}
    covered: set[str] = set()
    for name, selected in mask.selected.items():
        if name not in modules or name not in base_modules:
            problems.append(f"{name}: named by the neuron mask but absent from the models")
            continue
        info = mask.info[name]
        proj = Projection(name, modules[name], str(info["role"]), int(info["layer"]), info["role"] != "down")
        covered.update({f"{name}.weight", f"{name}.bias"})
        try:
            delta = _projection_delta(proj, base_modules[name], selected)
        except ValueError as err:
            problems.append(str(err))
            continue
        if delta is not None:
            deltas[name] = delta
    for key, value in trained_state.items():
        if key in covered or key not in base_state:
            continue
        if not _same(value, base_state[key]):
            problems.append(f"{key}: {_difference(value, base_state[key])}")
    if problems:
        raise ValueError(
            f"The trained model differs from the base model outside the selected neurons ({len(problems)} "
            f"tensors): {'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}. Pass the base model this "
            "run started from, loaded in the dtype it was trained in (hooks mode leaves every other weight "
            "bit-identical)."
        )
    return deltas


def _projection_delta(proj: Projection, base_module: nn.Module, selected: torch.Tensor) -> NeuronDelta | None:
    """The delta of one projection, or None where no neuron is selected; ValueError if others moved."""
    trained_w = neuron_vectors(proj, dense_weight(proj.module))
    base_w = neuron_vectors(proj, dense_weight(base_module))
    if trained_w.shape != base_w.shape or trained_w.shape[0] != selected.numel():
        raise ValueError(f"{proj.name}.weight: shapes {tuple(trained_w.shape)} (trained), {tuple(base_w.shape)} "
                         f"(base), {selected.numel()} neurons in the mask")
    outside = ~selected
    if not torch.equal(trained_w[outside], base_w[outside]):
        raise ValueError(f"{proj.name}.weight: {_difference(trained_w[outside], base_w[outside])} in "
                         "non-selected neurons")
    trained_b, base_b = getattr(proj.module, "bias", None), getattr(base_module, "bias", None)
    if (trained_b is None) != (base_b is None):
        raise ValueError(f"{proj.name}.bias: present in only one of the models")
    if trained_b is not None:  # an in-neuron owns its bias element; the output projection's bias is shared
        frozen = outside if proj.trains_bias else torch.ones_like(trained_b, dtype=torch.bool)
        if not torch.equal(trained_b.detach().float()[frozen], base_b.detach().float()[frozen]):
            raise ValueError(f"{proj.name}.bias: {_difference(trained_b[frozen], base_b[frozen])} outside the "
                             "selected neurons")
    index = selected.nonzero().flatten()
    if index.numel() == 0:
        return None
    in_features, out_features = trained_w.shape[::-1] if proj.is_input else trained_w.shape
    delta = NeuronDelta(index, proj.is_input, in_features, out_features, with_bias=proj.trains_bias)
    rows = trained_w[index] - base_w[index]
    delta.weight.data.copy_(rows if proj.is_input else rows.t())
    if delta.bias is not None:
        delta.bias.data.copy_(trained_b.detach().float()[index] - base_b.detach().float()[index])
    return delta.requires_grad_(False)


def _key_problems(trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> list[str]:
    problems = [f"{k}: only in the trained model" for k in sorted(trained.keys() - base.keys())]
    problems += [f"{k}: only in the base model" for k in sorted(base.keys() - trained.keys())]
    return problems


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values; floating tensors compare as fp32 (an exact upcast), so a bf16 base matches its bf16 copy."""
    if a.shape != b.shape:
        return False
    if a.is_floating_point() and b.is_floating_point():
        return torch.equal(a.detach().float(), b.detach().float())
    return torch.equal(a, b)


def _difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} (trained) vs {tuple(b.shape)} (base)"
    diff = (a.detach().float() - b.detach().float()).abs()
    return f"{int((diff > 0).sum())} values differ (max |diff| {diff.max().item():.3g}, dtypes {a.dtype}/{b.dtype})"
