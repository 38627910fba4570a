"""keye-dsa: DeepSeek Sparse Attention for GQA models (DESIGN §3-§4).

Ops (autograd-aware, Triton on CUDA, PyTorch reference elsewhere; ``KEYE_DSA_IMPL`` forces either):
``sparse_attention``, ``sparse_attention_varlen``, ``indexer_scores``, ``select_topk``,
``select_topk_decode`` (static cache, CUDA-graph replayable), ``indexer_kl_loss``. Modules:
``LightningIndexer``, ``DSAttention`` (with ``DSACache``, or ``StaticDSACache`` for CUDA graphs).
Training stages: ``set_dsa_mode``. Hugging Face models: ``patch_model`` / ``unpatch_model`` (extra
``hf``).
"""

from keye_dsa.modules.attention import DSAttention
from keye_dsa.modules.cache import DSACache, StaticDSACache
from keye_dsa.modules.indexer import LightningIndexer, set_dsa_mode
from keye_dsa.ops.indexer_kl import indexer_kl_loss
from keye_dsa.ops.indexer_topk import indexer_scores, select_topk
from keye_dsa.ops.indexer_topk.decode import select_topk_decode
from keye_dsa.ops.sparse_attention import sparse_attention, sparse_attention_varlen

__version__ = "0.1.0"


def patch_model(model, topk: int = 2048, num_heads: int = 4, head_dim: int = 128, **kwargs):
    """See ``keye_dsa.hf.patch_model`` (imported lazily: transformers is an optional extra)."""
    from keye_dsa.hf import patch_model as _patch

    return _patch(model, topk=topk, num_heads=num_heads, head_dim=head_dim, **kwargs)


def unpatch_model(model):
    """See ``keye_dsa.hf.unpatch_model``."""
    from keye_dsa.hf import unpatch_model as _unpatch

    return _unpatch(model)


__all__ = [
    "DSACache",
    "DSAttention",
    "LightningIndexer",
    "StaticDSACache",
    "indexer_kl_loss",
    "indexer_scores",
    "patch_model",
    "select_topk",
    "select_topk_decode",
    "set_dsa_mode",
    "sparse_attention",
    "sparse_attention_varlen",
    "unpatch_model",
]
