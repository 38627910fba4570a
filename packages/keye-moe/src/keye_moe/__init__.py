"""keye-moe: the Qwen3-MoE-style decoder of Keye-VL (DESIGN §5)."""

from keye_moe.cache import KVCache
from keye_moe.checkpoint import CheckpointError
from keye_moe.config import DecoderConfig, count_parameters
from keye_moe.generation import generate, sample_next
from keye_moe.hookspecs import AttentionBackend, AttentionInputs
from keye_moe.model import CausalLMOutput, KeyeMoeForCausalLM, build_on_meta
from keye_moe.plugins import PluginError, PluginHost, hookimpl
from keye_moe.registry import attention_backends, expert_backends, make_attention_backend, make_expert_backend

__version__ = "0.1.0"

__all__ = [
    "AttentionBackend",
    "AttentionInputs",
    "CausalLMOutput",
    "CheckpointError",
    "DecoderConfig",
    "KVCache",
    "KeyeMoeForCausalLM",
    "PluginError",
    "PluginHost",
    "attention_backends",
    "build_on_meta",
    "count_parameters",
    "expert_backends",
    "generate",
    "hookimpl",
    "make_attention_backend",
    "make_expert_backend",
    "sample_next",
]
