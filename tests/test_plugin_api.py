"""neft_trl.plugin_api: the one module a third-party selector imports, and the example plugin using only it."""

from __future__ import annotations

import ast
from pathlib import Path

from neft_trl import hookimpl

PLUGIN_SOURCE = Path(__file__).resolve().parents[1] / "plugins" / "neft-selector-magnitude"


def test_the_plugin_api_exports_what_a_selector_needs():
    from neft_trl import layers, neurons, plugin_api
    from neft_trl.selectors import base, tracing

    needed = {"NeuronSelector", "SelectionContext", "hookimpl", "dense_weight", "neuron_vectors", "Projection",
              "NeuronGroup", "NeuronMap", "frozen", "removing", "model_mode"}
    assert needed <= set(plugin_api.__all__)
    assert all(hasattr(plugin_api, name) for name in plugin_api.__all__)
    assert plugin_api.dense_weight is layers.dense_weight and plugin_api.neuron_vectors is neurons.neuron_vectors
    assert plugin_api.SelectionContext is base.SelectionContext and plugin_api.frozen is tracing.frozen
    assert plugin_api.hookimpl is hookimpl


def test_the_example_plugin_imports_only_the_plugin_api():
    source = PLUGIN_SOURCE / "src" / "neft_selector_magnitude" / "__init__.py"
    modules = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    assert {m for m in modules if m.split(".")[0] == "neft_trl"} == {"neft_trl.plugin_api"}
