"""keye-moe's own plugin, registered through its ``keye`` entry point like any third party's."""

from __future__ import annotations

from keye_moe.plugins import hookimpl


@hookimpl
def keye_attention_backends() -> dict[str, object]:
    from keye_moe.attention.sdpa import SdpaAttention

    return {"sdpa": SdpaAttention}
