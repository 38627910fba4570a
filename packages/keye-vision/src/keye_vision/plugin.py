"""keye-vision's ``keye`` entry point: registers the Keye ViT with keye-train's encoder registry."""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("keye")
