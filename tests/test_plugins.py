"""The plugin system: discovery through entry points, the autoload switch, and bad plugins named in errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_dataset, make_model, make_tokenizer, tiny_args

from neft_trl import NeFTSFTTrainer, SelectionContext, available_selectors, build_neuron_map, get_selector, hookimpl
from neft_trl.budget import Budget
from neft_trl.plugins import PluginError, manager, register_plugin
from neft_trl.plugins.manager import AUTOLOAD_ENV, DISABLE_ENV, _sources, plugin_manager
from neft_trl.selection import run_selector

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = ROOT / "plugins" / "neft-selector-magnitude"
BUILT_INS = {"activation", "cosine", "gradient", "random"}


def plugin_of(*selector_classes):
    """A plugin object whose hook registers the given selector classes."""

    class Plugin:
        @hookimpl
        def neft_register_selectors(self, register):
            for cls in selector_classes:
                register(cls)

    return Plugin()


@pytest.fixture
def plugins():
    """``add(plugin, name, package)`` registers a plugin for one test; all are unregistered afterwards."""
    names = []

    def add(plugin, name, package="tests-pkg"):
        names.append(name)
        register_plugin(plugin, name=name, package=package)

    yield add
    for name in names:
        if plugin_manager.has_plugin(name):
            plugin_manager.unregister(name=name)
        _sources.pop(name, None)


def context(arch="llama"):
    model = make_model(arch)
    return SelectionContext(model=model, neuron_map=build_neuron_map(model), budget=Budget.resolve(num_neurons=4))


def selector(name, scores=None, keep="highest", **attrs):
    """A selector class whose ``score`` returns ``scores(context)`` (default: its index as the score)."""

    def score(self, ctx):
        if scores is not None:
            return scores(ctx)
        return {g.key: torch.arange(g.size, dtype=torch.float32) for g in ctx.neuron_map.groups}

    return type(f"Sel_{name}", (), {"name": name, "keep": keep, "score": score, **attrs})


def test_built_ins_load_through_the_entry_points_of_neft_trl():
    found = available_selectors()
    assert BUILT_INS <= found.keys()
    assert {found[n].package for n in BUILT_INS} == {"neft-trl"}
    assert get_selector("cosine").selector_class.keep == "lowest"


def test_unknown_selector_lists_the_installed_ones():
    with pytest.raises(ValueError, match=r"Unknown neuron selector 'nope'.*cosine \(neft-trl\)"):
        get_selector("nope")
    with pytest.raises(ValueError, match="Unknown neuron selector 'nope'"):
        NeFTSFTTrainer(make_model(), None, selector="nope")


def test_a_runtime_plugin_is_used_and_its_scores_ranked(plugins):
    plugins(plugin_of(selector("by_index")), "index-plugin")
    ctx = context()
    mask = run_selector(ctx, "by_index")
    assert mask.metadata["selector_package"] == "tests-pkg" and mask.num_selected == 4
    # highest index wins; ties across groups go to the earlier group
    top = max(g.size for g in ctx.neuron_map.groups) - 1
    assert {n: mask.indices(n).tolist() for n in mask.selected if mask.indices(n).numel()} == {
        ctx.neuron_map.groups[i].key: [top] for i in range(4)
    }


def test_a_raising_selector_is_named(plugins):
    def boom(ctx):
        raise KeyError("no such thing")

    plugins(plugin_of(selector("boom", boom)), "boom-plugin")
    with pytest.raises(RuntimeError, match=r"selector boom \(from tests-pkg\) failed: KeyError"):
        run_selector(context(), "boom")


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        (lambda ctx: {g.key: torch.zeros(g.size + 1) for g in ctx.neuron_map.groups}, "shape \\(49,\\)"),
        (lambda ctx: {ctx.neuron_map.groups[0].key: torch.zeros(48)}, "scores for 1 groups"),
        (lambda ctx: {g.key: torch.full((g.size,), float("nan")) for g in ctx.neuron_map.groups}, "NaN"),
        (lambda ctx: [torch.zeros(g.size) for g in ctx.neuron_map.groups], "Return a dict keyed by"),
    ],
    ids=["wrong-shape", "missing-layers", "nan", "not-a-dict"],
)
def test_bad_scores_are_errors_naming_the_plugin(plugins, scores, message):
    plugins(plugin_of(selector("bad", scores)), "bad-plugin", package="bad-pkg")
    with pytest.raises(ValueError, match=rf"bad \(from bad-pkg\).*{message}"):
        run_selector(context(), "bad")


def test_two_plugins_with_one_name_are_an_error_naming_both(plugins):
    plugins(plugin_of(selector("twin")), "first", package="pkg-one")
    plugins(plugin_of(selector("twin")), "second", package="pkg-two")
    with pytest.raises(PluginError, match="'twin': 'pkg-one' and 'pkg-two'"):
        available_selectors()


def test_a_plugin_reusing_a_built_in_name_is_an_error(plugins):
    plugins(plugin_of(selector("random")), "impostor", package="impostor-pkg")
    with pytest.raises(PluginError, match="'random': 'neft-trl' and 'impostor-pkg'"):
        get_selector("random")


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (selector("sideways", keep="sideways"), "keep='sideways'"),
        (type("Nameless", (), {"keep": "lowest", "score": lambda self, c: {}}), "no string `name`"),
        (type("NoScore", (), {"name": "noscore", "keep": "lowest"}), "no score"),
    ],
    ids=["bad-keep", "no-name", "no-score"],
)
def test_malformed_selector_classes_are_rejected_with_the_package(plugins, cls, message):
    plugins(plugin_of(cls), "malformed", package="malformed-pkg")
    with pytest.raises(PluginError, match=rf"malformed-pkg.*{message}|{message}.*malformed-pkg"):
        available_selectors()


def test_a_misspelled_hook_is_an_error_not_a_silent_no_op():
    class Typo:
        @hookimpl
        def neft_register_selector(self, register):  # missing "s"
            raise AssertionError("never called")

    with pytest.raises(PluginError, match="typo-pkg.*unknown hook.*neft_register_selectors"):
        register_plugin(Typo(), name="typo", package="typo-pkg")
    assert not plugin_manager.has_plugin("typo")


def test_a_raising_registration_hook_is_named(plugins):
    class Broken:
        @hookimpl
        def neft_register_selectors(self, register):
            raise ImportError("missing dependency foo")

    plugins(Broken(), "broken", package="broken-pkg")
    with pytest.raises(PluginError, match="'broken' \\(from 'broken-pkg'\\) failed: ImportError: missing"):
        available_selectors()


def test_bad_selector_kwargs_name_the_selector():
    with pytest.raises(TypeError, match=r"selector random \(from neft-trl\).*unexpected keyword"):
        run_selector(context(), "random", {"colour": "red"})
    with pytest.raises(ValueError, match=r"selector cosine \(from neft-trl\).*probe_steps must be a positive"):
        run_selector(context(), "cosine", {"probe_steps": 0})


def test_a_selector_that_leaves_a_hook_or_flag_behind_is_rejected(plugins):
    def leaves_hook(ctx):
        ctx.model.lm_head.register_forward_hook(lambda *a: None)
        return {g.key: torch.zeros(g.size) for g in ctx.neuron_map.groups}

    def unfreezes(ctx):
        ctx.model.lm_head.weight.requires_grad_(False)
        return {g.key: torch.zeros(g.size) for g in ctx.neuron_map.groups}

    plugins(plugin_of(selector("leaky", leaves_hook), selector("thawing", unfreezes)), "sloppy", package="sloppy-pkg")
    with pytest.raises(RuntimeError, match=r"leaky \(from sloppy-pkg\) left \+1 module hooks"):
        run_selector(context(), "leaky")
    with pytest.raises(RuntimeError, match=r"thawing \(from sloppy-pkg\) changed requires_grad.*lm_head.weight"):
        run_selector(context(), "thawing")


def test_selection_restores_train_mode_and_rng(plugins):
    def draws(ctx):
        ctx.model.eval()
        torch.rand(3)
        return {g.key: torch.rand(g.size) for g in ctx.neuron_map.groups}

    plugins(plugin_of(selector("draws", draws)), "drawing")
    ctx = context()
    ctx.model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = run_selector(ctx, "draws")
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    assert ctx.model.training and all(m.training for m in ctx.model.modules())
    assert run_selector(ctx, "draws") == first  # seeded from context.seed, not from the caller's RNG


# -- the example third-party plugin, installed as a user would ----------------------------------------------

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
    yield
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
                             args=tiny_args(tmp_path, num_neurons=6, max_steps=1))
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
