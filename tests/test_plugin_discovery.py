"""Plugin discovery through entry points: the example third-party plugin installed as a user would, the
autoload switch, disabling plugins by name, and conflicting entry points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_dataset, make_model, make_tokenizer, tiny_args

from neft_trl import NeFTSFTTrainer, available_selectors
from neft_trl.plugins import PluginError, manager
from neft_trl.plugins.manager import AUTOLOAD_ENV, DISABLE_ENV, _sources, plugin_manager

PLUGIN_SOURCE = Path(__file__).resolve().parents[1] / "plugins" / "neft-selector-magnitude"
BUILT_INS = {"activation", "cosine", "gradient", "random"}


SCRIPT = r"""
import json
from neft_trl import available_selectors, get_selector

out = {"selectors": {n: i.package for n, i in available_selectors().items()}}
try:
    get_selector("magnitude")
except ValueError as err:
    out["error"] = str(err)
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """pip-install a copy of plugins/neft-selector-magnitude into a private folder (the repo and the
    environment stay untouched); tests put that folder on their path."""
    root = tmp_path_factory.mktemp("magnitude")
    source = root / "source"
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    return target


@pytest.fixture
def plugin_on_path(installed_plugin, monkeypatch):
    """The installed plugin visible to this process, as if pip had installed it here; fully undone afterwards."""
    monkeypatch.syspath_prepend(str(installed_plugin))
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    monkeypatch.setattr(manager, "_loaded_entry_points", False)  # discovery is cached per process: redo it
    _forget_magnitude()  # pip may have installed it in this venv too: start from a process that has not loaded it
    yield
    _forget_magnitude()


def _forget_magnitude() -> None:
    if plugin_manager.has_plugin("magnitude"):
        plugin_manager.unregister(name="magnitude")
    _sources.pop("magnitude", None)
    sys.modules.pop("neft_selector_magnitude", None)


def test_an_installed_third_party_plugin_is_discovered_and_used(plugin_on_path, tmp_path):
    assert available_selectors()["magnitude"].package == "neft-selector-magnitude"
    model = make_model("llama")
    norms = []  # an independent expectation: the 6 largest neuron-vector norms
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        for name, weight, dim in [("up_proj", mlp.up_proj.weight, 1), ("down_proj", mlp.down_proj.weight, 0)]:
            values = weight.detach().norm(dim=dim).tolist()
            norms += [(v, f"model.layers.{i}.mlp.{name}", n) for n, v in enumerate(values)]
    expected = sorted((name, n) for _, name, n in sorted(norms, reverse=True)[:6])

    trainer = NeFTSFTTrainer(model, make_dataset(), selector="magnitude", processing_class=make_tokenizer(),
                             args=tiny_args(tmp_path, num_neurons=6, max_steps=1, neuron_unit="vector",
                                            neuron_scope="global", protect_ratio=0.0))  # ranks vectors, all layers
    trainer.train()
    mask = trainer.neuron_mask
    assert mask.metadata["selector"] == "magnitude"
    assert mask.metadata["selector_package"] == "neft-selector-magnitude"
    assert sorted((name, n) for name in mask.selected for n in mask.indices(name).tolist()) == expected


def test_the_autoload_switch_hides_third_party_plugins_but_keeps_built_ins(installed_plugin):
    """In a fresh process (discovery is cached per process) with the plugin installed on its path."""
    env = {**os.environ, "PYTHONPATH": str(installed_plugin), "OMP_NUM_THREADS": "1", AUTOLOAD_ENV: "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])
    assert set(result["selectors"]) == BUILT_INS
    assert "Unknown neuron selector 'magnitude'" in result["error"]


def test_two_packages_declaring_one_entry_point_name_is_an_error(monkeypatch):
    """A third party's entry point named like a built-in must not be skipped silently."""
    from types import SimpleNamespace

    real = list(manager.entry_points(group=manager.ENTRY_POINT_GROUP))
    impostor = SimpleNamespace(name="random", value="other_pkg.selector", dist=SimpleNamespace(name="other-pkg"),
                               load=lambda: SimpleNamespace())
    monkeypatch.setattr(manager, "entry_points", lambda group: [*real, impostor])
    monkeypatch.setattr(manager, "_loaded_entry_points", False)
    with pytest.raises(PluginError, match="plugin 'random': 'neft-trl' and 'other-pkg'"):
        manager.available_selectors()


def test_disabling_plugins_by_name_skips_exactly_those(installed_plugin):
    """A third-party and a built-in plugin named in NEFT_TRL_DISABLE_PLUGINS are skipped; the others load."""
    env = {**os.environ, "PYTHONPATH": str(installed_plugin), "OMP_NUM_THREADS": "1", DISABLE_ENV: "magnitude, random"}
    env.pop(AUTOLOAD_ENV, None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])
    assert set(result["selectors"]) == BUILT_INS - {"random"}
    assert f"Plugins disabled by {DISABLE_ENV}: magnitude, random." in result["error"]


def test_disabling_an_installed_plugin_in_process(plugin_on_path, monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "magnitude")
    assert "magnitude" not in available_selectors() and BUILT_INS <= available_selectors().keys()
    monkeypatch.setattr(manager, "_loaded_entry_points", False)
    monkeypatch.delenv(DISABLE_ENV)
    assert available_selectors()["magnitude"].package == "neft-selector-magnitude"  # back when not disabled


def test_a_disabled_name_no_package_declares_is_an_error(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "magnitdue")
    monkeypatch.setattr(manager, "_loaded_entry_points", False)
    with pytest.raises(PluginError, match=rf"{DISABLE_ENV} names 'magnitdue', which no installed package declares"
                                          r".*Installed plugins .*cosine.*random"):
        available_selectors()


def test_disabling_a_name_two_packages_declare_skips_both(monkeypatch):
    from types import SimpleNamespace

    def broken():
        raise ImportError("must not be imported when disabled")

    real = [ep for ep in manager.entry_points(group=manager.ENTRY_POINT_GROUP) if ep.name != "gradient"]
    twins = [SimpleNamespace(name="twin", value=f"pkg{i}.sel", dist=SimpleNamespace(name=f"pkg-{i}"), load=broken)
             for i in (1, 2)]
    monkeypatch.setattr(manager, "entry_points", lambda group: [*real, *twins])
    monkeypatch.setattr(manager, "_loaded_entry_points", False)
    monkeypatch.setenv(DISABLE_ENV, "twin")
    assert "random" in available_selectors()  # neither twin was imported, and no conflict was raised
