"""keye-train's own ``keye`` entry point (datasets, rewards and callbacks it ships)."""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("keye")
