"""The cosine selector's default probe: the paper's short fine-tune, in memory bounded by the neurons, not the MLP.

The full probe (``probe.py``) trains a full-size fp32 delta for every candidate projection: 16 bytes per up/down
weight with AdamW (~60 GB for Llama-3-8B), more than a LoRA run of the same budget needs in total. But the cosine
score of a neuron needs only three numbers per neuron: ``|a|^2``, ``a.c`` and ``|c|^2`` for its original vector
``a`` and its accumulated change ``c`` (``cos = (|a|^2 + a.c) / (|a| |a + c|)``). This probe keeps exactly those:

- **Updates** follow Adam with its second moment factored per neuron (as Adafactor factors it per row): each
  step moves neuron ``n`` by ``-lr * m_n / (sqrt(v_n) + eps)`` with the usual bias corrections, where ``m_n`` is
  the momentum vector and ``v_n`` the mean squared gradient of that neuron. Like Adam, it gives every neuron the
  same mobility whatever its gradient scale; unlike element-wise Adam, the update stays linear in the gradients.
- **Linearity** makes every per-neuron vector (gradient, momentum, change) exactly representable by a random
  projection ``S`` (``sketch_dim`` x vector size, Gaussian, seeded): ``S c_n`` and the exact scalars ``a.c_n``
  and ``a.m_n`` are updated step by step; ``|c_n|^2`` is read from ``|S c_n|^2`` (Johnson-Lindenstrauss:
  relative error about ``sqrt(2 / sketch_dim)``, 12% at 128, unbiased).
- **Gradients** come from activation hooks (as in ``gradient.py``), never from weight gradients: for a row of
  up/gate, ``S g_n = (delta^T (x S^T))_n`` and ``a.g_n = sum_t delta[t, n] (y - b)[t, n]``; for a column of down,
  ``S g_n = (x^T (delta S^T))_n`` and ``a.g_n = sum_t x[t, n] (dL/dx)[t, n]``. No weight gradient or full-size
  tensor exists at any time, so it works on frozen and 4/8-bit bases alike and never writes the model.
- **First order**: gradients are taken at the original weights throughout (the model is never changed), which
  is what a probe of a few small steps measures; the schedule, accumulation, clipping and autocast are the run's.

Persistent state: three sketches of ``sketch_dim`` fp32 values per candidate neuron plus a few scalars:
``12 * sketch_dim / vector_size`` of the full probe's 16 bytes per weight (e.g. 380 MB vs 8.1 GB at
TinyLlama-1.1B's shape, 1.4 GB vs 60 GB at Llama-3-8B's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..layers import dense_weight
from ..neurons import Projection, neuron_vectors
from .base import SelectionContext
from .probe import optimizer_and_schedule
from .tracing import frozen, model_mode, removing

logger = logging.getLogger("neft_trl")

DEFAULT_SKETCH_DIM = 128


def random_projection(sketch_dim: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``S``: ``[sketch_dim, size]`` with N(0, 1/sketch_dim) entries, so that ``E |S x|^2 = |x|^2``.

    Where the vectors are no longer than the sketch, ``S`` is the identity: exact, and no larger.
    """
    if size <= sketch_dim:
        return torch.eye(size)
    return torch.randn(sketch_dim, size, generator=generator) / sketch_dim**0.5


@dataclass
class NeuronSketch:
    """One projection's probe state, one row per neuron (all fp32 except the exact fp64 dot products)."""

    vector_size: int  # d, the length of one neuron vector
    aa: torch.Tensor  # [N] |a|^2 (fp64)
    grad: torch.Tensor  # [N, m] S g, this step's gradient (summed over micro-batches)
    grad_a: torch.Tensor  # [N] a.g (fp64)
    momentum: torch.Tensor  # [N, m] S m
    momentum_a: torch.Tensor  # [N] a.m (fp64)
    change: torch.Tensor  # [N, m] S c
    change_a: torch.Tensor  # [N] a.c (fp64)
    second: torch.Tensor  # [N] v, per-neuron mean squared gradient (fp64)

    @classmethod
    def zeros(cls, vector_size: int, aa: torch.Tensor, sketch_dim: int) -> NeuronSketch:
        """The state before the first step: no gradient, momentum or change yet."""
        vector = torch.zeros(aa.numel(), min(sketch_dim, vector_size), device=aa.device)
        return cls(vector_size, aa, vector, torch.zeros_like(aa), vector.clone(), torch.zeros_like(aa), vector.clone(),
                   torch.zeros_like(aa), torch.zeros_like(aa))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if torch.is_tensor(t))

    def dot_sums(self) -> torch.Tensor:
        """``[N, 3]`` fp64 ``|a|^2, |b|^2, a.b`` for ``b = a + c``, the inputs of the cosine."""
        cc = self.change.double().square().sum(1)
        return torch.stack([self.aa, self.aa + 2 * self.change_a + cc, self.aa + self.change_a], dim=1).cpu()


def run_sketch_probe(
    context: SelectionContext, steps: int, learning_rate: float | None, sketch_dim: int = DEFAULT_SKETCH_DIM
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Probe ``steps`` optimizer steps; return per-projection ``[N, 3]`` cosine dot sums and metadata facts."""
    model, neuron_map = context.model, context.neuron_map
    generator = torch.Generator().manual_seed(context.seed)
    sketches, projections = {}, {}
    for proj in neuron_map:
        device = proj.module.weight.device
        size = proj.vector_size
        if size not in projections:
            projections[size] = random_projection(sketch_dim, size, generator).to(device)
        aa = neuron_vectors(proj, dense_weight(proj.module)).double().square().sum(1)
        sketches[proj.name] = NeuronSketch.zeros(size, aa, sketch_dim)
    optimizer, scheduler, accumulation, max_grad_norm = optimizer_and_schedule(
        context, [torch.zeros(1, requires_grad=True)], steps, learning_rate)
    group = optimizer.param_groups[0]
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    eps = group.get("eps", 1e-8)

    def add_rows(proj: Projection, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> None:
        """A row of up/gate: ``S g_n = delta^T (x S^T)``, ``a.g_n = sum_t delta (y - b)``."""
        s, sk = projections[proj.vector_size], sketches[proj.name]
        g = _tokens(g)
        sk.grad += g.t() @ (_tokens(x) @ s.t())
        bias = getattr(proj.module, "bias", None)
        base = _tokens(y) - (bias.detach().float() if bias is not None else 0.0)
        sk.grad_a += (g * base).sum(0, dtype=torch.float64)

    def add_columns(proj: Projection, x: torch.Tensor, g: torch.Tensor, gx: torch.Tensor) -> None:
        """A column of down: ``S g_n = x^T (delta S^T)``, ``a.g_n = sum_t x (dL/dx)``."""
        s, sk = projections[proj.vector_size], sketches[proj.name]
        x = _tokens(x)
        sk.grad += x.t() @ (_tokens(g) @ s.t())
        sk.grad_a += (x * _tokens(gx)).sum(0, dtype=torch.float64)

    def on_forward(proj: Projection, inputs: tuple, output: torch.Tensor) -> None:
        if not output.requires_grad:  # the no-grad first pass of reentrant activation checkpointing
            return
        x, y = inputs[0].detach(), output.detach()
        if proj.is_input:
            output.register_hook(lambda g: add_rows(proj, x, y, g))
            return
        seen: dict[str, torch.Tensor] = {}  # down needs both dL/dy and dL/dx of this call

        def on_output_grad(g: torch.Tensor) -> None:
            seen["g"] = g

        def on_input_grad(gx: torch.Tensor) -> None:
            add_columns(proj, x, seen.pop("g"), gx)

        output.register_hook(on_output_grad)
        inputs[0].register_hook(on_input_grad)

    state_bytes = sum(sk.nbytes() for sk in sketches.values()) + sum(
        s.numel() * s.element_size() for s in projections.values())
    logger.info("NeFT cosine probe (sketch, dim %d): %d steps, state %.1f MiB", sketch_dim, steps, state_bytes / 2**20)
    done = 0
    # frozen(input_grads=True): with every weight frozen, activations must still require grad for the hooks
    with model_mode(model, training=True), frozen(model, input_grads=True), removing([]) as handles:
        for proj in neuron_map:
            handles.append(proj.module.register_forward_hook(
                lambda m, args, out, proj=proj: on_forward(proj, args, out)))
        for index, batch in enumerate(context.iter_batches(steps * accumulation, "cosine", "NeFT cosine probe"), 1):
            loss = context.loss(model, batch) / accumulation
            if not loss.requires_grad:
                raise RuntimeError("The loss does not depend on the MLP activations (no gradient flows).")
            loss.backward()
            if index % accumulation:
                continue
            done += 1
            _adam_step(sketches, done, group["lr"], beta1, beta2, eps, max_grad_norm)
            if scheduler is not None:
                optimizer.step()  # a no-op (its one dummy element has no gradient), in the order the scheduler expects
                scheduler.step()
    lr = scheduler.base_lrs[0] if scheduler is not None else group["lr"]
    meta = {"probe": "sketch", "probe_steps": str(done), "probe_learning_rate": f"{lr:g}",
            "sketch_dim": str(sketch_dim), "probe_state_bytes": str(state_bytes)}
    return {name: sk.dot_sums() for name, sk in sketches.items()}, meta


@torch.no_grad()
def _adam_step(sketches: dict[str, NeuronSketch], step: int, lr: float, beta1: float, beta2: float, eps: float,
               max_grad_norm: float | None) -> None:
    """One Adam step with a per-neuron second moment, applied to the sketched state; gradients then reset."""
    sizes = {name: sk.grad.double().square().sum(1) for name, sk in sketches.items()}  # |g_n|^2 estimates
    scale = 1.0
    if max_grad_norm and max_grad_norm > 0:
        norm = float(sum(s.sum() for s in sizes.values())) ** 0.5
        scale = min(1.0, max_grad_norm / (norm + 1e-6))  # as clip_grad_norm_ computes it
    for name, sk in sketches.items():
        mean_square = sizes[name] * scale**2 / sk.vector_size
        sk.second.mul_(beta2).add_(mean_square, alpha=1 - beta2)
        sk.momentum.mul_(beta1).add_(sk.grad, alpha=(1 - beta1) * scale)
        sk.momentum_a.mul_(beta1).add_(sk.grad_a, alpha=(1 - beta1) * scale)
        denom = (sk.second / (1 - beta2**step)).sqrt() + eps
        coef = -lr / (1 - beta1**step) / denom  # [N] per-neuron step size
        sk.change.add_(sk.momentum * coef.unsqueeze(1).float())
        sk.change_a.add_(sk.momentum_a * coef)
        sk.grad.zero_()
        sk.grad_a.zero_()


def _tokens(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1, tensor.shape[-1]).float()
