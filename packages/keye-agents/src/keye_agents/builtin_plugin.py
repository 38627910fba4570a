"""keye-agents' own ``keye`` entry point: the built-in tools and model backends."""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("keye")
