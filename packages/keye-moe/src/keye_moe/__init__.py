"""keye-moe: the Qwen3-MoE-style decoder of Keye-VL (DESIGN §5)."""

from keye_moe.hookspecs import AttentionBackend, AttentionInputs
from keye_moe.plugins import PluginError, PluginHost, hookimpl
from keye_moe.registry import attention_backends, expert_backends, make_attention_backend

__version__ = "0.1.0"

__all__ = [
    "AttentionBackend",
    "AttentionInputs",
    "PluginError",
    "PluginHost",
    "attention_backends",
    "expert_backends",
    "hookimpl",
    "make_attention_backend",
]
