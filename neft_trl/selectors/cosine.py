"""``cosine`` (the paper's selector): keep the neurons whose weight vectors moved most during fine-tuning.

Each candidate vector (a row of up/gate, a column of down; for ``neuron_unit="mlp"`` the concatenation of
the unit's vectors) is compared between the original model and a fine-tuned reference by cosine
similarity; the lowest similarities win. The reference is either given (``reference_model``: a folder or
a model object with the same module names) or made by a short probe fine-tune (``probe.py``).

Fine-tuned similarities are all within ~1e-4 of 1 (the paper saw 0.998 to 0.9999; a short probe at
lr 2e-5 gives ~1 - 1e-9), where fp32 cosine values collapse into ties. So the sums are accumulated in
fp64 and the score returned is ``cos - 1`` (same ranking as ``cos``, but its fp32 value keeps full precision).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..layers import dense_weight, features
from ..loading import load_model
from ..neurons import NeuronMap, Projection, neuron_vectors
from ..plugins import hookimpl
from .base import NeuronSelector, SelectionContext
from .probe import default_probe_steps, run_probe
from .sketch_probe import DEFAULT_SKETCH_DIM, run_sketch_probe

#: ``change(projection, original_dense_weight) -> fp32 [out, in]``: fine-tuned minus original weight.
Change = Callable[[Projection, torch.Tensor], torch.Tensor]
#: ``dot_sums(projection) -> fp64 [num_neurons, 3]``: ``|a|^2, |b|^2, a.b`` of original ``a`` and fine-tuned ``b``.
DotSums = Callable[[Projection], torch.Tensor]
PROBES = ("sketch", "full")
CHUNK = 4096  # neurons per fp64 block: bounds the scoring's extra memory on large layers


class CosineSelector(NeuronSelector):
    """Cosine similarity between original and fine-tuned neuron vectors, in fp32 inputs with fp64 sums; lowest kept.

    Args:
        reference_model: an already fine-tuned model: a local folder (loaded with ``AutoModelForCausalLM``
            in fp32 on CPU) or a model object. Projections are matched by module name.
        probe_steps: without a reference, fine-tune for this many optimizer steps first. Default: a
            twentieth of the run's optimizer steps (``max_steps``, or epochs x batches), at least 10 (shorter
            probes rank by weight norm) and at most 50; 50 where the run length is unknown.
        probe_learning_rate: the probe's learning rate. Default: the trainer's ``learning_rate`` (2e-5,
            the paper's, outside a trainer).
        probe: ``"sketch"`` (default): the memory-bounded probe of ``sketch_probe.py`` (per-neuron state only,
            first order, per-neuron Adam); ``"full"``: the paper's probe, full-size deltas trained with the run's
            own optimizer (16 bytes per up/down weight; ``probe.py``).
        sketch_dim: the sketch probe's random-projection size (default 128: ~12% error on ``|c|^2``).
    """

    name = "cosine"
    keep = "lowest"

    def __init__(self, reference_model: str | os.PathLike | nn.Module | None = None, probe_steps: int | None = None,
                 probe_learning_rate: float | None = None, probe: str = "sketch",
                 sketch_dim: int = DEFAULT_SKETCH_DIM):
        super().__init__()
        if probe not in PROBES:
            raise ValueError(f"Selector 'cosine': probe={probe!r} is not one of {PROBES}.")
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim < 1:
            raise ValueError(f"Selector 'cosine': sketch_dim must be a positive integer, got {sketch_dim!r}.")
        if reference_model is not None and not isinstance(reference_model, (str, os.PathLike, nn.Module)):
            raise ValueError(f"Selector 'cosine': reference_model must be a folder path or a model, got "
                             f"{type(reference_model).__name__}.")
        if reference_model is not None and (probe_steps is not None or probe_learning_rate is not None):
            raise ValueError("Selector 'cosine': probe_steps/probe_learning_rate configure the probe, which does not "
                             "run when reference_model is given; drop one or the other.")
        if probe_steps is not None and (isinstance(probe_steps, bool) or not isinstance(probe_steps, int)
                                        or probe_steps < 1):
            raise ValueError(f"Selector 'cosine': probe_steps must be a positive integer, got {probe_steps!r}.")
        if probe_learning_rate is not None and not probe_learning_rate > 0:
            raise ValueError(f"Selector 'cosine': probe_learning_rate must be > 0, got {probe_learning_rate!r}.")
        self.reference_model = reference_model
        self.probe_steps = probe_steps
        self.probe_learning_rate = probe_learning_rate
        self.probe = probe
        self.sketch_dim = sketch_dim

    def score(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        if self.reference_model is not None:
            reference, source = _load_reference(self.reference_model)
            self.metadata["reference_model"] = source
            change = _reference_change(context.neuron_map, reference, source)
            scores = cosine_scores(context.neuron_map, _change_sums(change))
            del reference
        elif self.probe == "full":
            result = run_probe(context, self._probe_steps(context), self.probe_learning_rate)
            self.metadata.update(
                probe="full", probe_steps=str(result.steps), probe_learning_rate=f"{result.learning_rate:g}",
                probe_state_bytes=str(result.state_bytes),
                full_finetune_state_bytes=str(result.full_finetune_state_bytes),
            )
            scores = cosine_scores(context.neuron_map, _change_sums(lambda proj, weight: result.deltas[proj.name]))
            del result
        else:
            sums, facts = run_sketch_probe(context, self._probe_steps(context), self.probe_learning_rate,
                                           self.sketch_dim)
            self.metadata.update(facts)
            scores = cosine_scores(context.neuron_map, lambda proj: sums[proj.name])
        if all(bool((s == 0).all()) for s in scores.values()):
            how = "the reference model equals the original" if self.reference_model is not None else (
                "the probe changed no weight (learning rate 0, or no gradient reached the MLPs?)")
            raise ValueError(f"Selector 'cosine': every candidate scored cosine 1, so {how}; nothing to rank. "
                             "Give a fine-tuned reference_model, or raise probe_steps / probe_learning_rate.")
        return scores

    def _probe_steps(self, context: SelectionContext) -> int:
        return self.probe_steps or default_probe_steps(context)


def cosine_scores(neuron_map: NeuronMap, dot_sums: DotSums) -> dict[str, torch.Tensor]:
    """``cos - 1`` per candidate of every group, from fp64 sums of ``a.a``, ``b.b``, ``a.b`` over its vectors."""
    scores = {}
    for group in neuron_map.groups:
        sums = sum(dot_sums(proj) for proj in group.projections)
        aa, bb, ab = sums.unbind(1)
        norms = (aa * bb).sqrt()
        cos = torch.where(norms > 0, ab / norms.clamp_min(torch.finfo(torch.float64).tiny),
                          (aa == bb).double())  # a zero vector: unchanged -> 1, else 0
        scores[group.key] = (cos - 1).float().cpu()
    return scores


def _change_sums(change: Change) -> DotSums:
    """Dot sums from a dense change per projection (a reference model, or the full probe's deltas)."""

    def dot_sums(proj: Projection) -> torch.Tensor:
        """``[num_neurons, 3]`` fp64: ``|a|^2``, ``|b|^2``, ``a.b`` for original ``a`` and ``b = a + change``."""
        weight = dense_weight(proj.module)
        a_all = neuron_vectors(proj, weight)
        c_all = neuron_vectors(proj, change(proj, weight))
        parts = []
        for start in range(0, a_all.shape[0], CHUNK):
            a = a_all[start:start + CHUNK].double()
            b = a + c_all[start:start + CHUNK].double()
            parts.append(torch.stack([(a * a).sum(1), (b * b).sum(1), (a * b).sum(1)], dim=1))
        return torch.cat(parts).cpu()

    return dot_sums


def _load_reference(reference: Any) -> tuple[nn.Module, str]:
    if isinstance(reference, nn.Module):
        return reference, getattr(getattr(reference, "config", None), "_name_or_path", "") or type(reference).__name__
    path = os.fspath(reference)
    try:
        model = load_model(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ValueError(f"Selector 'cosine' could not load reference_model={path!r} ({err}). Pass a local folder "
                         "written by save_pretrained, or a loaded model object.") from err
    return model, path


def _reference_change(neuron_map: NeuronMap, reference: nn.Module, source: str) -> Change:
    """Match every candidate projection by module name and shape; return ``reference - original`` per projection."""
    modules = dict(reference.named_modules())
    missing = [p.name for p in neuron_map if p.name not in modules]
    if missing:
        example = next((n for n in modules if n.endswith(missing[0].rsplit(".", 1)[-1])), "none")
        raise ValueError(f"Selector 'cosine': reference_model {source!r} has no module {missing[0]!r} "
                         f"({len(missing)} candidate projections missing; a similar name there: {example!r}). "
                         "The reference must be the same architecture, saved without wrappers (e.g. a merged model).")
    for proj in neuron_map:
        if features(modules[proj.name]) != features(proj.module):
            raise ValueError(f"Selector 'cosine': {proj.name!r} is {features(proj.module)} (in, out) in the model "
                             f"but {features(modules[proj.name])} in reference_model {source!r}.")

    def change(proj: Projection, weight: torch.Tensor) -> torch.Tensor:
        return dense_weight(modules[proj.name]).to(weight.device) - weight

    return change


@hookimpl
def neft_register_selectors(register):
    register(CosineSelector)
