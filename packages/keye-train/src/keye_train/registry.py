"""keye-train's plugin host: keye-moe's hooks plus its own, over the ``keye`` entry points."""

from __future__ import annotations

import functools

from keye_moe import hookspecs as moe_hookspecs
from keye_moe.plugins import PluginHost, lookup
from keye_train import hookspecs


@functools.cache
def plugin_host() -> PluginHost:
    return PluginHost(moe_hookspecs, hookspecs)


def component(hook_name: str, kind: str, name: str):
    """The factory called ``name`` from the registry that ``hook_name`` builds."""
    return lookup(plugin_host().registry(hook_name), kind, name)
