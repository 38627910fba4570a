"""The decode benchmark case of issue 3, shared by ``bench_dsa.py`` and ``sweep_decode.py``.

One new token per row against a 128K cache (capacity 128K + 256, filled length as a device tensor),
batch 8, Hq=32, Hkv=4, D=128, 4 index heads x 128, top-k 2048, random normal inputs; ``smoke``: tiny.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from keye_dsa.ops.indexer_topk.decode import quantize_index_keys


def decode_case(dev: str, smoke: bool, dtype: torch.dtype) -> SimpleNamespace:
    """Queries, caches (K/V, bf16/fp32 index keys and their FP8 form), gates and filled lengths."""
    b, s, hq, hkv, d, h_i, d_i, topk = (
        (2, 300, 8, 2, 16, 4, 16, 16) if smoke else (8, 131072, 32, 4, 128, 4, 128, 2048)
    )
    cap = s + 256
    q = torch.randn(b, 1, hq, d, device=dev, dtype=dtype)
    k = torch.randn(b, cap, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(b, cap, hkv, d, device=dev, dtype=dtype)
    qi = torch.randn(b, 1, h_i, d_i, device=dev, dtype=dtype)
    ki = torch.randn(b, cap, d_i, device=dev, dtype=dtype)
    w = torch.randn(b, 1, h_i, device=dev, dtype=torch.float32)
    k8, k_scale = quantize_index_keys(ki)
    lengths = torch.full((b,), s, dtype=torch.int32, device=dev)
    return SimpleNamespace(b=b, s=s, topk=topk, q=q, k=k, v=v, qi=qi, ki=ki, w=w, k8=k8, k_scale=k_scale,
                           lengths=lengths)  # fmt: skip
