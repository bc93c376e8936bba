"""neft_trl's plugin system: selectors are pluggy plugins found through the ``neft_trl.selectors`` entry points."""

from .hookspecs import hookimpl, hookspec
from .manager import PluginError, SelectorInfo, available_selectors, get_selector, plugin_manager, register_plugin

__all__ = ["PluginError", "SelectorInfo", "available_selectors", "get_selector", "hookimpl", "hookspec",
           "plugin_manager", "register_plugin"]
