"""Plugin discovery for the ``keye`` entry-point group, shared by every consuming package.

Why this module exists: each consuming package owns its hookspecs (DESIGN §2), but they all load the
same entry points the same way, honour ``KEYE_PLUGINS`` the same way, and must refuse a component name
registered twice. keye-train builds on this module; keye-dsa and keye-vision only need ``hookimpl``
from pluggy itself and never import it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pluggy

PROJECT = "keye"
ENTRY_POINT_GROUP = "keye"
PLUGINS_ENV = "KEYE_PLUGINS"

hookimpl = pluggy.HookimplMarker(PROJECT)


class PluginError(RuntimeError):
    """A plugin could not be loaded, or two plugins claim the same component name."""


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin: where it came from and which hooks it implements."""

    name: str
    module: str
    distribution: str
    version: str
    hooks: tuple[str, ...] = field(default_factory=tuple)


def allowed_plugin_names() -> set[str] | None:
    """Entry-point names listed in ``KEYE_PLUGINS``, or None when every plugin may load."""
    raw = os.environ.get(PLUGINS_ENV)
    if raw is None or not raw.strip():
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def implemented_hooks(plugin: object) -> tuple[str, ...]:
    """Hook names a plugin object implements, whichever package owns their specs."""
    marker = f"{PROJECT}_impl"
    return tuple(sorted(name for name in dir(plugin) if hasattr(getattr(plugin, name, None), marker)))


def _entry_points() -> Iterable[metadata.EntryPoint]:
    seen: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        previous = seen.get(ep.name)
        if previous is not None and previous.value != ep.value:
            raise PluginError(
                f"two distributions declare the keye entry point {ep.name!r}: "
                f"{_dist_label(previous)} ({previous.value}) and {_dist_label(ep)} ({ep.value})"
            )
        seen[ep.name] = ep
    return seen.values()


def _dist_label(ep: metadata.EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


class PluginHost:
    """A pluggy manager for the ``keye`` project plus what it knows of each plugin's origin."""

    def __init__(self, *spec_modules: types.ModuleType, load_entry_points: bool = True):
        self.manager = pluggy.PluginManager(PROJECT)
        for module in spec_modules:
            self.manager.add_hookspecs(module)
        self.infos: dict[str, PluginInfo] = {}
        if load_entry_points:
            self.load_entry_points()

    def load_entry_points(self) -> None:
        allowed = allowed_plugin_names()
        for ep in _entry_points():
            if allowed is not None and ep.name not in allowed:
                continue
            if ep.name in self.infos:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # any import failure must name the plugin that caused it
                raise PluginError(
                    f"keye plugin {ep.name!r} from {_dist_label(ep)} failed to load "
                    f"{ep.value!r}: {type(exc).__name__}: {exc}"
                ) from exc
            dist = ep.dist
            self.register(
                plugin,
                name=ep.name,
                distribution=dist.name if dist is not None else "?",
                version=dist.version if dist is not None else "?",
            )

    def register(
        self, plugin: object, *, name: str, distribution: str = "(in process)", version: str = ""
    ) -> None:
        """Register a plugin object by hand (tests, notebooks) exactly as an entry point would be."""
        if name in self.infos:
            raise PluginError(f"a keye plugin named {name!r} is already registered")
        self.manager.register(plugin, name=name)
        module = getattr(plugin, "__name__", type(plugin).__qualname__)
        self.infos[name] = PluginInfo(name, module, distribution, version, implemented_hooks(plugin))

    def registry(self, hook_name: str) -> dict[str, Callable[..., object]]:
        """Merge the name -> factory dicts that every plugin returns from a no-argument hook."""
        caller = getattr(self.manager.hook, hook_name, None)
        if caller is None:
            raise PluginError(f"no hook named {hook_name!r} is specified in this plugin host")
        merged: dict[str, Callable[..., object]] = {}
        owners: dict[str, str] = {}
        for impl in caller.get_hookimpls():  # registration order
            provided = impl.function()
            if not isinstance(provided, dict):
                raise PluginError(
                    f"plugin {impl.plugin_name!r} returned {type(provided).__name__} from {hook_name}; "
                    "expected a dict of name -> factory"
                )
            for component, factory in provided.items():
                if component in merged:
                    raise PluginError(
                        f"{hook_name}: the name {component!r} is registered by both plugin "
                        f"{owners[component]!r} and plugin {impl.plugin_name!r}"
                    )
                if not callable(factory):
                    raise PluginError(
                        f"{hook_name}: plugin {impl.plugin_name!r} registered {component!r} with a "
                        f"non-callable {type(factory).__name__}"
                    )
                merged[component] = factory
                owners[component] = impl.plugin_name
        return merged

    def plugins(self) -> list[PluginInfo]:
        return sorted(self.infos.values(), key=lambda info: info.name)


def lookup(registry: dict[str, Callable[..., object]], kind: str, name: str) -> Callable[..., object]:
    """Fetch a factory by name, or fail with the names that are available."""
    try:
        return registry[name]
    except KeyError:
        available = ", ".join(sorted(registry)) or "none"
        raise PluginError(
            f"no {kind} named {name!r}; available: {available} "
            f"(is the plugin installed, and allowed by {PLUGINS_ENV}?)"
        ) from None
