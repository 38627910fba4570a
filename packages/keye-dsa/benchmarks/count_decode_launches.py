"""Launch census of one ``DSAttention`` decode step: what a graph-captured layer pays for, kernel by kernel.

A decode step at batch 8 is bound by its launches rather than its bytes outside attention, so the count
is the number to drive down. Rows: the layer with its indexer off (dense SDPA over a static cache), DSA
with bf16 and FP8 index keys, and FP8 with the reference indexer prologue (~30 PyTorch ops) instead of
its kernel; then an index dim unlike the head dim, where the indexer computes its own rotary angles
(~10 ops more, as with keye-moe's backend), kernel and reference. On CUDA the torch profiler counts GPU
kernels (memsets and copies included); on the CPU (``TRITON_INTERPRET=1``, the Triton path forced) a
dispatch census counts the aten ops that compute, which on a GPU would each be a launch, plus the
Triton launches.

    PYTHONPATH=packages/keye-dsa/src python packages/keye-dsa/benchmarks/count_decode_launches.py --out c.json
    TRITON_INTERPRET=1 PYTHONPATH=packages/keye-dsa/src python \\
        packages/keye-dsa/benchmarks/count_decode_launches.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from keye_dsa import DSAttention, StaticDSACache
from keye_dsa.modules import indexer as indexer_module
from keye_dsa.ops.index_prologue import index_prologue
from keye_dsa.ops.index_prologue.reference import index_prologue_reference

# aten ops that only make views or allocate: no kernel of their own
NO_KERNEL = {
    "_reshape_alias", "_unsafe_view", "alias", "as_strided", "detach", "empty", "empty_like", "empty_strided",
    "expand", "lift_fresh", "new_empty", "permute", "resolve_conj", "resolve_neg", "select", "slice", "split",
    "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unsqueeze", "view",
}  # fmt: skip


class _Census(TorchDispatchMode):
    """Counts aten ops that compute, and (through ``count_triton``) Triton launches."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.in_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL and not self.in_triton:  # the interpreter's own tensor ops do not count
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _count_triton(census: _Census):
    """Wraps the interpreter's launch to count each Triton kernel under ``census``."""
    from triton.runtime.interpreter import InterpretedFunction

    launch = InterpretedFunction.run

    def run(self, *args, **kwargs):
        census.counts["triton:" + self.fn.__name__] += 1
        census.in_triton = True
        try:
            return launch(self, *args, **kwargs)
        finally:
            census.in_triton = False

    InterpretedFunction.run = run
    return lambda: setattr(InterpretedFunction, "run", launch)


def census(step) -> collections.Counter:
    """Kernels (CUDA) or computing ops and Triton launches (CPU) of one call of ``step``."""
    if torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return collections.Counter(e.name[:60] for e in kernels)
    mode = _Census()
    restore = _count_triton(mode)
    try:
        with mode:
            step()
    finally:
        restore()
    return mode.counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--verbose", action="store_true", help="list every kernel / op")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu and (os.environ.get("TRITON_INTERPRET") != "1"):
        raise SystemExit("on the CPU, run with TRITON_INTERPRET=1 (the census follows the Triton path)")
    os.environ["KEYE_DSA_IMPL"] = "triton"
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    hidden, heads, kv_heads, d, topk, prompt = (
        (4096, 32, 4, 128, 2048, 4096) if gpu else (256, 8, 2, 32, 16, 40)
    )
    rows = {}
    for name, mode, index_dtype, prologue, index_dim in (
        ("indexer off (masked SDPA)", "off", None, index_prologue, d),
        ("DSA, bf16 index keys", "sparse", None, index_prologue, d),
        ("DSA, FP8 index keys", "sparse", torch.float8_e4m3fn, index_prologue, d),
        ("DSA, FP8 index keys, reference prologue", "sparse", torch.float8_e4m3fn, index_prologue_reference,
         d),
        # an index dim unlike the head dim: the indexer computes its own rotary angles (as keye-moe's)
        ("DSA, FP8, own angles", "sparse", torch.float8_e4m3fn, index_prologue, d // 2),
        ("DSA, FP8, own angles, reference prologue", "sparse", torch.float8_e4m3fn, index_prologue_reference,
         d // 2),
    ):  # fmt: skip
        torch.manual_seed(0)
        attn = DSAttention(hidden, heads, kv_heads, d, index_heads=4, index_head_dim=index_dim, topk=topk)
        attn = attn.to(dev, dtype).eval()
        attn.sa_indexer.mode = mode
        indexer_module.index_prologue = prologue
        cache = StaticDSACache(8, prompt + 16, index_dtype=index_dtype)
        with torch.no_grad():
            attn(torch.randn(8, prompt, hidden, device=dev, dtype=dtype), cache=cache)
            x = torch.randn(8, 1, hidden, device=dev, dtype=dtype)
            attn(x, cache=cache)  # compiles the kernels outside the census
            counts = census(lambda cache=cache, x=x, attn=attn: attn(x, cache=cache))
        rows[name] = {"launches": sum(counts.values()), "by_name": dict(counts.most_common())}
        print(f"{name:<44} {rows[name]['launches']:>4} {'kernels' if gpu else 'ops + Triton launches'}")
        if args.verbose:
            for k, n in counts.most_common():
                print(f"    {n:>3}  {k}")
    indexer_module.index_prologue = index_prologue
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if gpu else "cpu (dispatch census)",
                "commit": os.environ.get("KEYE_COMMIT", "unknown")}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
