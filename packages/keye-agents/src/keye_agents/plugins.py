"""Finds keye-agents' tools and backends in every ``keye`` entry point (DESIGN §2).

Why its own loader: keye-agents must not depend on the model packages, and what it needs is narrow:
load the allowed entry points (``KEYE_PLUGINS``), name the plugin behind any import failure, and merge
each hook's name -> component dicts, refusing a name that two plugins both claim.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from keye_agents import hookspecs


class PluginError(RuntimeError):
    """A plugin failed to import, or two plugins registered the same name."""


@dataclass
class Plugins:
    """The loaded plugins, where each came from, and the merged registries of the three hooks."""

    manager: pluggy.PluginManager
    origins: dict[str, str] = field(default_factory=dict)  # plugin name -> "dist version"

    def registry(self, hook: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for impl in getattr(self.manager.hook, hook).get_hookimpls():
            provided = impl.function()
            if not isinstance(provided, dict):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: {hook}() must return a dict, got {provided!r}"
                )
            for name, component in provided.items():
                if name in merged:
                    raise PluginError(
                        f"{hook}: {name!r} is registered twice, by plugin {owner[name]!r} and by plugin "
                        f"{impl.plugin_name!r}; disable one of them with KEYE_PLUGINS"
                    )
                merged[name], owner[name] = component, impl.plugin_name
        return merged

    def tools(self) -> dict[str, Any]:
        return self.registry("keye_agent_tools")

    def backends(self) -> dict[str, Any]:
        return self.registry("keye_agent_backends")

    def search_backends(self) -> dict[str, Any]:
        return self.registry("keye_agent_search_backends")


def allowed_plugins() -> set[str] | None:
    """Entry-point names in ``KEYE_PLUGINS`` (comma list), or None when it is unset or empty."""
    names = {n.strip() for n in os.environ.get("KEYE_PLUGINS", "").split(",") if n.strip()}
    return names or None


def load_plugins(extra: Iterable[tuple[str, object]] = (), *, entry_points: bool = True) -> Plugins:
    """Load allowed ``keye`` entry points plus ``extra`` (name, module-or-object) pairs given in process."""
    manager = pluggy.PluginManager("keye")
    manager.add_hookspecs(hookspecs)
    plugins = Plugins(manager)
    allowed = allowed_plugins()
    found = importlib.metadata.entry_points(group="keye") if entry_points else ()
    for ep in sorted(found, key=lambda e: e.name):
        if (allowed is not None and ep.name not in allowed) or manager.has_plugin(ep.name):
            continue
        origin = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
        try:
            module = ep.load()
        except Exception as exc:
            raise PluginError(
                f"keye plugin {ep.name!r} ({ep.value}, from {origin}) failed to import: "
                f"{type(exc).__name__}: {exc}; uninstall it or leave it out of KEYE_PLUGINS"
            ) from exc
        manager.register(module, name=ep.name)
        plugins.origins[ep.name] = origin
    for name, obj in extra:
        manager.register(obj, name=name)
        plugins.origins[name] = "in process"
    return plugins
