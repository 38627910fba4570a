"""The decode benchmark case of issue 3 and its timing, shared by ``bench_dsa.py`` and ``sweep_decode.py``.

One new token per row against a 128K cache (capacity 128K + 256, filled length as a device tensor),
batch 8, Hq=32, Hkv=4, D=128, 4 index heads x 128, top-k 2048, random normal inputs; ``smoke``: tiny.
"""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import torch

from keye_dsa.ops.indexer_topk.decode import quantize_index_keys


def decode_case(dev: str, smoke: bool, dtype: torch.dtype, shape_only: bool = False) -> SimpleNamespace:
    """Queries, caches (K/V, bf16/fp32 index keys and their FP8 form), gates and filled lengths; with
    ``shape_only``, the sizes alone."""
    b, s, hq, hkv, d, h_i, d_i, topk = (
        (2, 300, 8, 2, 16, 4, 16, 16) if smoke else (8, 131072, 32, 4, 128, 4, 128, 2048)
    )
    if shape_only:
        return SimpleNamespace(b=b, s=s, hq=hq, hkv=hkv, d=d, h_i=h_i, d_i=d_i, topk=topk)
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


def fill_static_cache(cache, length: int) -> None:
    """Random K, V and index keys (FP8: quantized, with their scales) in every layer of a
    ``StaticDSACache`` whose buffers exist, filled to ``length`` tokens: a long cache without a prefill."""
    for state in cache.layers.values():
        for name in ("k", "v"):
            state[name].normal_()
        if "k_index" in state:
            keys = torch.randn(state["k_index"].shape, device=state["k"].device, dtype=state["k"].dtype)
            if "k_index_scale" in state:
                state["k_index"], state["k_index_scale"] = quantize_index_keys(keys)  # same shapes
            else:
                state["k_index"].copy_(keys)
        state["length"].fill_(length)
        state["lengths"].fill_(length)


def graphed(fn):
    """``fn`` captured once in a CUDA graph (after a run outside it that compiles and allocates); the
    returned callable replays it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


SLEEP_CYCLES = 200_000  # ~100 us of GPU clock: longer than the host takes to launch a graph


def graph_replay_ms(replay, reps: int) -> tuple[float, float]:
    """Median ms of one replay of a captured CUDA graph, timed by an event pair around it, two ways:
    with a sleep kernel queued ahead, so the GPU starts the replay as soon as it is free and the pair
    times the GPU's work alone (kernels and the gaps between them), and on an idle GPU, where the pair
    also takes in the host's launch of the graph (a few microseconds more for a graph of several
    kernels than for one: a decoder replays all its layers from one graph and pays it once a token)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(reps):
        for busy in (True, False):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if busy:
                torch.cuda._sleep(SLEEP_CYCLES)
            start.record()
            replay()
            end.record()
            torch.cuda.synchronize()
            times[busy].append(start.elapsed_time(end))
    return statistics.median(times[True]), statistics.median(times[False])
