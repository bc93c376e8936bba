"""``hooks`` mode: the projections' own full-precision weights train; gradient hooks zero the rest.

Only projections that hold selected neurons get ``requires_grad``; every other parameter is frozen. Each
trainable weight (and an in-neuron's bias) gets a tensor hook that sets its frozen neurons' gradient to
exactly zero (``torch.where``, not a product: ``inf * 0`` is NaN, and a NaN there would reach the frozen
weights through clipping and the optimizer), so gradient clipping, accumulation and DDP all see masked
gradients, and Adam-style optimizers never move a neuron whose gradient was always zero. FSDP replaces the
parameters (and drops their hooks), so this mode refuses a sharded model, before attaching and again when an
optimizer is built (``sharding.py``).

Weight decay is the one thing an optimizer applies without a gradient: AdamW's ``p *= 1 - lr * wd`` would
shrink frozen rows. So these weights are kept out of the optimizer's decay group, and an optimizer step
pre-hook applies the same decoupled decay to the selected neurons only. Frozen neurons stay bit-identical.

Fused MoE experts (3-D ``gate_up_proj``/``down_proj``) train the same way: their selected rows/columns of
every expert are OR-ed into one mask per parameter, so one hook and one decay mask cover all experts.
"""

from __future__ import annotations

import torch

from ..experts import fused_gradient_targets, is_expert_view
from ..sharding import check_unsharded
from .base import NeuronTraining


class GradientMaskTraining(NeuronTraining):
    """Train selected rows/columns of the original weights in place (full-precision models)."""

    mode = "hooks"

    def attach(self) -> None:
        check_unsharded(self.model, "train hooks mode")
        self.freeze_model()
        names = {id(p): n for n, p in self.model.named_parameters()}
        self._handles = []
        self._masked: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []  # (name, param, broadcast mask)
        # fused MoE experts: one combined mask per 3-D parameter (see experts.py)
        targets = fused_gradient_targets(self.neuron_map, self.mask.selected)
        for proj in self.neuron_map:
            selected = self.mask.selected[proj.name]
            if not selected.any() or is_expert_view(proj.module):
                continue
            weight = proj.module.weight
            shape = [1, 1]
            shape[proj.neuron_dim] = -1
            targets.append((weight, selected.view(shape)))
            if proj.trains_bias:
                targets.append((proj.module.bias, selected))
        for param, keep in targets:
            keep = keep.to(device=param.device, dtype=param.dtype)
            param.requires_grad_(True)
            self._handles.append(param.register_hook(_zero_frozen(keep.bool())))
            self._masked.append((names[id(param)], param, keep))

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """As the base's, but a model sharded after ``attach`` is refused: its new parameters carry no mask hooks."""
        check_unsharded(self.model, "train hooks mode")
        return super().named_trainable_parameters()

    def detach(self) -> None:
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []
        self.unfreeze_model()

    def no_decay_parameter_names(self) -> set[str]:
        return {name for name, _, _ in self._masked}

    def install_weight_decay(self, optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
        """Decoupled (AdamW-style) decay on the selected neurons' weights only, before each optimizer step."""
        decayed = [(p, keep) for name, p, keep in self._masked if not name.endswith("bias")]
        if weight_decay == 0 or not decayed:
            return
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}

        @torch.no_grad()
        def decay_selected(opt, args, kwargs):
            for param, keep in decayed:
                group = group_of.get(id(param))
                if group is None or param.grad is None:
                    continue
                factor = 1 - group["lr"] * weight_decay
                param.mul_(keep * (factor - 1) + 1)

        self._handles.append(optimizer.register_step_pre_hook(decay_selected))


def _zero_frozen(keep: torch.Tensor):
    """A gradient hook: the frozen neurons' entries become exactly 0, whatever the raw gradient holds (inf, NaN)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    return hook
