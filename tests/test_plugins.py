"""The plugin system in one process: built-ins, runtime plugins, and bad plugins named in errors.

An installed third-party plugin, the autoload switch and disabling plugins by name: ``test_plugin_discovery.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from neft_trl import NeFTSFTTrainer, SelectionContext, available_selectors, build_neuron_map, get_selector, hookimpl
from neft_trl.budget import Budget
from neft_trl.plugins import PluginError, register_plugin
from neft_trl.plugins.manager import _sources, plugin_manager
from neft_trl.selection import run_selector

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
