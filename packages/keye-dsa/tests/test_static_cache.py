"""``StaticDSACache``: fixed-shape decoding equals the growing ``DSACache``, and a CUDA graph replays it."""

import pytest
import torch

from keye_dsa import DSACache, DSAttention, StaticDSACache
from keye_dsa.modules.core import left_padding_starts
from keye_dsa.testing import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
# prefill past DECODE_ROWS (host path), then a short chunk and single tokens (the capturable path)
CHUNKS = (20, 3, 1, 1, 1, 1)


def _layer(topk: int, mode: str = "sparse", dtype=torch.float32) -> DSAttention:
    torch.manual_seed(0)
    attn = DSAttention(48, 8, 2, 16, index_heads=2, index_head_dim=16, topk=topk).eval()
    attn.sa_indexer.mode = mode
    return attn.to(DEVICE, dtype)


def _run(attn, x, cache, mask=None, after_prefill=None) -> torch.Tensor:
    """Feeds ``x`` chunk by chunk; the padding mask covers the keys so far."""
    outs, at = [], 0
    with torch.no_grad():
        for n in CHUNKS:
            kw = {} if mask is None else {"key_padding_mask": mask[:, : at + n]}
            outs.append(attn(x[:, at : at + n], cache=cache, **kw))
            at += n
            if at == CHUNKS[0] and after_prefill is not None:
                after_prefill(cache)
    return torch.cat(outs, 1)


def _poison_unfilled(cache: StaticDSACache) -> None:
    """Rows past the length must never be read: fill them with values that would show."""
    for state in cache.layers.values():
        n = int(state["length"])
        for name in ("k", "v", "k_index", "k_index_scale"):
            if name in state:
                buf = state[name]
                if buf.dtype == FP8:  # 0x7E: 448, e4m3's largest finite value
                    buf.view(torch.uint8)[:, n:] = 0x7E
                else:
                    buf[:, n:] = 1e4


@pytest.mark.parametrize(
    ("mode", "index_dtype", "impl"),
    [("sparse", None, "reference"), ("sparse", FP8, "reference"), ("sparse", None, "triton"),
     ("sparse", FP8, "triton"), ("dense_warmup", None, "reference"), ("off", None, "reference")],
)  # fmt: skip
def test_static_cache_equals_growing_cache(force_impl, mode, index_dtype, impl):
    force_impl(impl)
    attn = _layer(topk=6, mode=mode)
    x = torch.randn(2, sum(CHUNKS), 48, device=DEVICE)
    want = _run(attn, x, DSACache(index_dtype=index_dtype))
    cache = StaticDSACache(2, 40, index_dtype=index_dtype)
    assert rel_err(_run(attn, x, cache, after_prefill=_poison_unfilled), want) < 1e-5
    assert cache.seq_len() == sum(CHUNKS)
    state = cache.layer(0)
    assert state["k"].shape == (2, 40, 2, 16) and state["lengths"].tolist() == [sum(CHUNKS)] * 2
    if mode != "off":
        assert state["k_index"].shape == (2, 40, 16) and state["k_index"].dtype == (index_dtype or x.dtype)


def test_static_cache_left_padding_and_reset(force_impl):
    force_impl("reference")
    attn = _layer(topk=5)
    x = torch.randn(2, sum(CHUNKS), 48, device=DEVICE)
    mask = torch.ones(2, sum(CHUNKS), dtype=torch.bool, device=DEVICE)
    mask[1, :4] = False  # row 1 is left padded by 4 tokens
    want = _run(attn, x, DSACache(), mask)
    cache = StaticDSACache(2, 32, key_start=left_padding_starts(mask))
    got = _run(attn, x, cache)
    assert rel_err(got[1, 4:], want[1, 4:]) < 1e-5 and rel_err(got[0], want[0]) < 1e-5
    buffers = {n: t.data_ptr() for n, t in cache.layer(0).items() if isinstance(t, torch.Tensor)}
    cache.reset()
    assert cache.seq_len() == 0
    assert rel_err(_run(attn, x, cache), got) == 0  # same buffers, same results
    assert all(cache.layer(0)[n].data_ptr() == p for n, p in buffers.items() if n != "positions")


def test_static_cache_errors(force_impl):
    """On the CPU (on CUDA the overflow is a device-side assert, which ends the process's CUDA context)."""
    force_impl("reference")
    attn = _layer(topk=4).cpu()
    cache = StaticDSACache(2, 8)
    x = torch.randn(2, 6, 48)
    with torch.no_grad():
        attn(x, cache=cache)
        with pytest.raises(RuntimeError, match="past its capacity of 8"):
            attn(x[:, :3], cache=cache)
        with pytest.raises(ValueError, match="made for 2"):
            attn(torch.randn(3, 1, 48), cache=StaticDSACache(2, 8))
    with pytest.raises(RuntimeError, match="inference cache"):
        attn(x, cache=StaticDSACache(2, 8))
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        StaticDSACache(2, 0)
    with pytest.raises(ValueError, match="index_dtype"):
        StaticDSACache(2, 8, index_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"key_start must have shape \(2,\)"):
        StaticDSACache(2, 8, key_start=torch.zeros(3, dtype=torch.int32))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("index_dtype", [None, FP8])
def test_static_cache_decode_step_replays_from_a_cuda_graph(index_dtype):
    """One captured step of a DSA layer (indexer, cache writes, top-k, sparse attention) replayed for
    every new token gives the eager step's outputs, in bf16 against a cache longer than top-k."""
    torch.manual_seed(0)
    attn = DSAttention(256, 8, 2, 32, index_heads=4, index_head_dim=64, topk=64).cuda().bfloat16().eval()
    x = torch.randn(2, 340, 256, device="cuda", dtype=torch.bfloat16)
    eager, graphed = (
        StaticDSACache(2, 400, index_dtype=index_dtype),
        StaticDSACache(2, 400, index_dtype=index_dtype),
    )
    with torch.no_grad():
        want = [attn(x[:, :300], cache=eager)] + [attn(x[:, i : i + 1], cache=eager) for i in range(300, 340)]
        attn(x[:, :300], cache=graphed)
        step_in = x[:, 300:301].clone()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compiles the kernels) on a throwaway copy of the cache
            scratch = StaticDSACache(2, 400, index_dtype=index_dtype)
            attn(x[:, :300], cache=scratch)
            attn(step_in, cache=scratch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step_out = attn(step_in, cache=graphed)
        assert graphed.seq_len() == 300  # capturing records the step; it does not run it
        got = []
        for i in range(300, 340):
            step_in.copy_(x[:, i : i + 1])
            graph.replay()
            got.append(step_out.clone())
    assert graphed.seq_len() == 340
    assert rel_err(torch.cat(got, 1), torch.cat(want[1:], 1)) < 1e-2
