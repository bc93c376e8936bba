"""What a third-party neuron selector may import: the public, stable surface for plugin authors.

Import from here, not from neft_trl's inner modules (``neft_trl.layers``, ``neft_trl.neurons``, ...), which
may move between releases; these names keep their meaning. A selector plugin is a module with a
``@hookimpl`` ``neft_register_selectors(register)`` function, declared under the entry-point group
``neft_trl.selectors`` in its ``pyproject.toml`` (see ``plugins/neft-selector-magnitude`` and the README)::

    import torch
    from neft_trl.plugin_api import SelectionContext, dense_weight, hookimpl, neuron_vectors

    class MagnitudeSelector:
        name, keep = "magnitude", "highest"            # the selector= string; which scores win

        def score(self, context: SelectionContext) -> dict[str, torch.Tensor]:
            return {group.key: sum(neuron_vectors(p, dense_weight(p.module)).norm(dim=1)
                                   for p in group.projections).cpu()
                    for group in context.neuron_map.groups}

    @hookimpl
    def neft_register_selectors(register):
        register(MagnitudeSelector)

The contract:

- ``score(context)`` returns one finite float per candidate of every ``NeuronGroup`` in
  ``context.neuron_map.groups``, keyed by ``group.key``; the core ranks them, applies the budget and builds
  the mask. ``keep`` says whether the ``"lowest"`` or the ``"highest"`` scores win.
- The selector's ``__init__`` takes the user's ``selector_kwargs``; a bad value raises ``UsageError`` (or
  ``ValueError``) naming the fix.
- Data comes from ``context.iter_batches`` / ``context.loss`` (the trainer's own batches and loss); random
  draws from ``context.generator()``. The model must be left as found: no hooks, ``requires_grad`` flags or
  gradients left behind (the core checks, and restores train/eval mode and every RNG).
- Weights: ``dense_weight(module)`` is the weight as the forward pass uses it (dequantized for 4/8-bit
  layers, ``[out, in]`` for every layer class); ``neuron_vectors(projection, weight)`` turns it into one row
  per neuron (an up/gate row or a down column); ``features(module)`` is ``(in, out)``; ``is_quantized``
  tells a bitsandbytes layer.
- Instrumentation goes through the context managers that always take it off again: ``removing(handles)``
  (hook handles), ``frozen(model, input_grads=False)`` (``requires_grad`` flags), ``model_mode(model,
  training)`` (train/eval flags).
- Optionally subclass ``NeuronSelector`` and fill ``self.metadata`` (strings saved with the mask).

To switch plugins off: ``NEFT_TRL_DISABLE_PLUGINS=name,other`` skips the named ones,
``NEFT_TRL_DISABLE_PLUGIN_AUTOLOAD=1`` every third-party one.
"""

from __future__ import annotations

from .budget import Budget
from .errors import UsageError
from .layers import dense_weight, features, is_quantized
from .neurons import NeuronGroup, NeuronMap, Projection, neuron_vectors
from .plugins.hookspecs import hookimpl
from .selectors.base import Batch, NeuronSelector, SelectionContext
from .selectors.tracing import frozen, model_mode, removing

__all__ = [
    "Batch",
    "Budget",
    "NeuronGroup",
    "NeuronMap",
    "NeuronSelector",
    "Projection",
    "SelectionContext",
    "UsageError",
    "dense_weight",
    "features",
    "frozen",
    "hookimpl",
    "is_quantized",
    "model_mode",
    "neuron_vectors",
    "removing",
]
