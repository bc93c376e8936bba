"""One module-level plugin manager; built-in and third-party selectors load through the same entry points.

Set ``NEFT_TRL_DISABLE_PLUGIN_AUTOLOAD=1`` to load only neft_trl's own selectors (third-party packages
stay installed but hidden), or ``NEFT_TRL_DISABLE_PLUGINS=magnitude,other`` to skip the named plugins only
(entry-point names, built-ins included; a name no installed package declares is an error, not a silent
no-op); call ``register_plugin`` to add a plugin from a test or a notebook.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from ..errors import UsageError
from . import hookspecs

ENTRY_POINT_GROUP = "neft_trl.selectors"
AUTOLOAD_ENV = "NEFT_TRL_DISABLE_PLUGIN_AUTOLOAD"
DISABLE_ENV = "NEFT_TRL_DISABLE_PLUGINS"
OWN_DISTRIBUTION = "neft-trl"

plugin_manager = pluggy.PluginManager("neft_trl")
plugin_manager.add_hookspecs(hookspecs)
_sources: dict[str, str] = {}  # plugin name -> distribution that provides it
_loaded_entry_points = False
_disabled: set[str] = set()  # entry-point names skipped through DISABLE_ENV, named when a selector is unknown


class PluginError(UsageError):
    """A plugin that cannot be used as installed; the message names the plugin, its package and the fix."""


@dataclass(frozen=True)
class SelectorInfo:
    """A selector found through the plugin system, and the package that provides it."""

    name: str
    selector_class: type
    package: str


def register_plugin(plugin: object, name: str | None = None, package: str = "(registered at runtime)") -> None:
    """Register a plugin module or object now (tests, notebooks). Its selectors appear immediately.

    A hook implementation whose name is not a neft_trl hook (a typo such as ``neft_register_selector``) is an
    error here rather than a plugin that silently never runs.
    """
    try:
        registered = plugin_manager.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as err:
        raise PluginError(f"Plugin {name or plugin!r} from {package!r} cannot be registered: {err}.") from err
    if registered is None:
        raise PluginError(f"Plugin {name or plugin!r} is already registered.")
    _sources[registered] = package
    try:
        plugin_manager.check_pending()
    except pluggy.PluginValidationError as err:
        plugin_manager.unregister(name=registered)
        del _sources[registered]
        known = ", ".join(n for n in dir(hookspecs) if n.startswith("neft_"))
        raise PluginError(f"Plugin {registered!r} from {package!r} implements an unknown hook ({err}). "
                         f"neft_trl's hooks: {known}.") from err


def _load_entry_points() -> None:
    """Register every ``neft_trl.selectors`` entry point once per process (built-ins always, others unless disabled)."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    autoload = os.environ.get(AUTOLOAD_ENV, "").lower() not in ("1", "true", "yes")
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    disabled = _disabled_names({ep.name for ep in found})
    for ep in found:
        package = ep.dist.name if ep.dist is not None else "?"
        if ep.name in disabled or (not autoload and _normalize(package) != OWN_DISTRIBUTION):
            continue
        if plugin_manager.has_plugin(ep.name):
            if _sources.get(ep.name) == package:
                continue  # already loaded (an earlier call, or the same distribution twice on sys.path)
            raise PluginError(
                f"Two packages declare the neft_trl plugin {ep.name!r}: {_sources.get(ep.name)!r} and {package!r}. "
                f"Uninstall one of them, rename one entry point, set {DISABLE_ENV}={ep.name} to skip both, or set "
                f"{AUTOLOAD_ENV}=1 to load only neft_trl's own selectors."
            )
        try:
            plugin = ep.load()
        except Exception as err:
            raise PluginError(
                f"The neft_trl plugin {ep.name!r} ({ep.value}) from package {package!r} failed to import: "
                f"{type(err).__name__}: {err}. Fix or uninstall {package!r}, set {DISABLE_ENV}={ep.name} to skip it, "
                f"or set {AUTOLOAD_ENV}=1 to load only neft_trl's own selectors."
            ) from err
        register_plugin(plugin, name=ep.name, package=package)
    _disabled.clear()
    _disabled.update(disabled)
    _loaded_entry_points = True  # only after every plugin loaded: a broken one keeps failing loudly


def _disabled_names(installed: set[str]) -> set[str]:
    """The plugin names in ``NEFT_TRL_DISABLE_PLUGINS``; one that no installed package declares is an error."""
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    unknown = sorted(names - installed)
    if unknown:
        raise PluginError(
            f"{DISABLE_ENV} names {', '.join(map(repr, unknown))}, which no installed package declares as a "
            f"neft_trl plugin. Installed plugins (entry points {ENTRY_POINT_GROUP!r}): {', '.join(sorted(installed))}. "
            f"Fix the name or remove it from {DISABLE_ENV}."
        )
    return names


def available_selectors() -> dict[str, SelectorInfo]:
    """Every installed selector, name -> ``SelectorInfo``. Two plugins claiming one name is an error."""
    _load_entry_points()
    found: dict[str, SelectorInfo] = {}
    for impl in plugin_manager.hook.neft_register_selectors.get_hookimpls():
        package = _sources.get(impl.plugin_name, impl.plugin_name)

        def register(selector_class: type, _package: str = package) -> None:
            _check_selector_class(selector_class, _package)
            name = selector_class.name
            if name in found:
                raise PluginError(
                    f"Two plugins register the selector {name!r}: {found[name].package!r} and {_package!r}. "
                    f"Uninstall one of them, or set {AUTOLOAD_ENV}=1 to load only neft_trl's own selectors."
                )
            found[name] = SelectorInfo(name, selector_class, _package)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as err:
            raise PluginError(f"The neft_register_selectors hook of plugin {impl.plugin_name!r} (from {package!r}) "
                               f"failed: {type(err).__name__}: {err}") from err
    return dict(sorted(found.items()))


def _check_selector_class(selector_class: type, package: str) -> None:
    """What the core relies on: a string ``name``, ``keep`` in lowest/highest, and a callable ``score``."""
    name = getattr(selector_class, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"Selector {selector_class!r} from {package!r} has no string `name` attribute.")
    keep = getattr(selector_class, "keep", None)
    if keep not in ("lowest", "highest"):
        raise PluginError(f"Selector {name!r} from {package!r} has keep={keep!r}; set the class attribute keep to "
                         "'lowest' or 'highest' (which scores win).")
    if not callable(getattr(selector_class, "score", None)):
        raise PluginError(f"Selector {name!r} from {package!r} has no score(context) method.")


def get_selector(name: str) -> SelectorInfo:
    """Look a selector up by name; an unknown name lists the installed ones."""
    selectors = available_selectors()
    if name not in selectors:
        installed = ", ".join(f"{n} ({i.package})" for n, i in selectors.items()) or "none"
        disabled = f" Plugins disabled by {DISABLE_ENV}: {', '.join(sorted(_disabled))}." if _disabled else ""
        raise UsageError(
            f"Unknown neuron selector {name!r}. Installed selectors: {installed}.{disabled} Install a package that "
            f"provides it (entry-point group {ENTRY_POINT_GROUP!r}) or pick one of these."
        )
    return selectors[name]


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-")
