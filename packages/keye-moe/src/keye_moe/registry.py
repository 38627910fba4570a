"""keye-moe's view of the plugins: its own hookspecs loaded over the ``keye`` entry points."""

from __future__ import annotations

import functools

from keye_moe import hookspecs
from keye_moe.plugins import PluginHost, lookup


@functools.cache
def plugin_host() -> PluginHost:
    """The process-wide plugin host for keye-moe's hooks (entry points load once)."""
    return PluginHost(hookspecs)


def attention_backends() -> dict[str, hookspecs.AttentionBackendFactory]:
    return plugin_host().registry("keye_attention_backends")  # type: ignore[return-value]


def expert_backends() -> dict[str, hookspecs.ExpertBackendFactory]:
    return plugin_host().registry("keye_expert_backends")  # type: ignore[return-value]


def make_attention_backend(name: str, config: object) -> hookspecs.AttentionBackend:
    """Build the attention backend called ``name`` for a decoder config."""
    factory = lookup(attention_backends(), "attention backend", name)
    return factory(config)  # type: ignore[return-value]


def make_expert_backend(name: str) -> hookspecs.ExpertBackend:
    factory = lookup(expert_backends(), "expert backend", name)
    return factory()  # type: ignore[return-value]
