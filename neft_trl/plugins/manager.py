"""One module-level plugin manager; built-in and third-party selectors load through the same entry points.

Set ``NEFT_TRL_DISABLE_PLUGIN_AUTOLOAD=1`` to load only neft_trl's own selectors (third-party packages
stay installed but hidden); call ``register_plugin`` to add a plugin from a test or a notebook.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "neft_trl.selectors"
AUTOLOAD_ENV = "NEFT_TRL_DISABLE_PLUGIN_AUTOLOAD"
OWN_DISTRIBUTION = "neft-trl"

plugin_manager = pluggy.PluginManager("neft_trl")
plugin_manager.add_hookspecs(hookspecs)
_sources: dict[str, str] = {}  # plugin name -> distribution that provides it
_loaded_entry_points = False


@dataclass(frozen=True)
class SelectorInfo:
    """A selector found through the plugin system, and the package that provides it."""

    name: str
    selector_class: type
    package: str


def register_plugin(plugin: object, name: str | None = None, package: str = "(registered at runtime)") -> None:
    """Register a plugin module or object now (tests, notebooks). Its selectors appear immediately."""
    registered = plugin_manager.register(plugin, name=name)
    if registered is None:
        raise ValueError(f"Plugin {name or plugin!r} is already registered.")
    _sources[registered] = package


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    autoload = os.environ.get(AUTOLOAD_ENV, "").lower() not in ("1", "true", "yes")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        package = ep.dist.name if ep.dist is not None else "?"
        if not autoload and _normalize(package) != OWN_DISTRIBUTION:
            continue
        if plugin_manager.has_plugin(ep.name):
            continue
        register_plugin(ep.load(), name=ep.name, package=package)


def available_selectors() -> dict[str, SelectorInfo]:
    """Every installed selector, name -> ``SelectorInfo``. Two plugins claiming one name is an error."""
    _load_entry_points()
    found: dict[str, SelectorInfo] = {}
    for impl in plugin_manager.hook.neft_register_selectors.get_hookimpls():
        package = _sources.get(impl.plugin_name, impl.plugin_name)

        def register(selector_class: type, _package: str = package) -> None:
            name = getattr(selector_class, "name", None)
            if not isinstance(name, str) or not name:
                raise ValueError(f"Selector {selector_class!r} from {_package!r} has no string `name` attribute.")
            if name in found:
                raise ValueError(
                    f"Two plugins register the selector {name!r}: {found[name].package!r} and {_package!r}. "
                    f"Uninstall one of them, or set {AUTOLOAD_ENV}=1 to load only neft_trl's own selectors."
                )
            found[name] = SelectorInfo(name, selector_class, _package)

        impl.function(register=register)
    return dict(sorted(found.items()))


def get_selector(name: str) -> SelectorInfo:
    """Look a selector up by name; an unknown name lists the installed ones."""
    selectors = available_selectors()
    if name not in selectors:
        installed = ", ".join(f"{n} ({i.package})" for n, i in selectors.items()) or "none"
        raise ValueError(
            f"Unknown neuron selector {name!r}. Installed selectors: {installed}. Install a package that provides "
            f"it (entry-point group {ENTRY_POINT_GROUP!r}) or pick one of these."
        )
    return selectors[name]


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-")
