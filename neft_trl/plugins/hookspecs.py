"""The hooks a neft_trl plugin can implement. This module is the plugin author's reference.

A plugin is a module (or object) with functions marked ``@neft_trl.hookimpl``, declared in its package's
``pyproject.toml`` under the entry-point group ``neft_trl.selectors``::

    [project.entry-points."neft_trl.selectors"]
    magnitude = "neft_selector_magnitude"

neft_trl's own selectors (cosine, activation, gradient, random) are registered exactly this way.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("neft_trl")
hookimpl = pluggy.HookimplMarker("neft_trl")


@hookspec
def neft_register_selectors(register: Callable[..., None]) -> None:
    """Register neuron selectors by calling ``register(SelectorClass)`` once per selector.

    A selector class has a class attribute ``name`` (the string users pass as ``selector=``), a class
    attribute ``keep`` (``"lowest"`` or ``"highest"``: which scores win), an ``__init__`` that accepts the
    user's ``selector_kwargs`` as keyword arguments, and ``score(context) -> dict[str, Tensor]`` returning
    one float score per candidate neuron for every ``NeuronGroup`` of ``context.neuron_map``. See
    ``neft_trl.selectors.base.NeuronSelector`` and ``SelectionContext``.
    """
