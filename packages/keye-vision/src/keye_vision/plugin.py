"""keye-vision's ``keye`` entry point: registers the Keye ViT with keye-train's encoder registry."""

from __future__ import annotations

from typing import Any

import pluggy

hookimpl = pluggy.HookimplMarker("keye")


@hookimpl
def keye_vision_encoders() -> dict[str, Any]:
    """``keye-vit``: factory(config) -> KeyeViT; config is a VisionConfig or a ``vision_config`` dict."""

    def keye_vit(config: Any) -> Any:
        from .config import VisionConfig
        from .model import KeyeViT

        if isinstance(config, dict):
            config = VisionConfig.from_dict(config)
        if not isinstance(config, VisionConfig):
            raise TypeError(
                f"keye-vit needs a VisionConfig or a vision_config dict; got {type(config).__name__}"
            )
        return KeyeViT(config)

    return {"keye-vit": keye_vit}
