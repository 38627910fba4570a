"""keye-moe's own plugin, registered through its ``keye`` entry point like any third party's."""

from __future__ import annotations

from keye_moe.plugins import hookimpl


@hookimpl
def keye_attention_backends() -> dict[str, object]:
    from keye_moe.attention.sdpa import SdpaAttention

    return {"sdpa": SdpaAttention}


@hookimpl
def keye_expert_backends() -> dict[str, object]:
    from keye_moe.experts.grouped import GroupedMMExperts
    from keye_moe.experts.loop import LoopExperts

    backends: dict[str, object] = {"loop": LoopExperts, "grouped_mm": GroupedMMExperts}
    try:
        from keye_moe.experts.triton import TritonExperts
    except ImportError:  # triton is a Linux-only dependency
        return backends
    backends["triton"] = TritonExperts
    return backends


@hookimpl
def keye_decoders() -> dict[str, object]:
    """keye-train's hook: the decoder factory, ``factory(config) -> KeyeMoeForCausalLM``.

    ``config`` may be a DecoderConfig or a Hugging Face config dict.
    """
    from keye_moe.config import DecoderConfig
    from keye_moe.model import KeyeMoeForCausalLM

    def make_decoder(config: DecoderConfig | dict) -> KeyeMoeForCausalLM:
        if isinstance(config, dict):
            config = DecoderConfig.from_hf_config(config)
        return KeyeMoeForCausalLM(config)

    return {"keye-moe": make_decoder}
