"""MoE layer and decode benchmarks for keye-moe (issue 4 §6), correctness first.

1. Correctness: every fast expert backend (grouped_mm, triton) against the loop reference on fresh
   random inputs, forward and backward, at the benchmark shape and at an awkward small shape (sizes that
   are not tile multiples, experts without tokens).
2. The MoE block (router, dispatch, experts, combine) at the Qwen3-30B-A3B shape, forward and
   forward+backward, for each keye-moe expert backend and for transformers' Qwen3MoeSparseMoeBlock with
   each experts implementation this transformers supports, plus the bare gathered F.grouped_mm GEMMs.
   TFLOP/s count expert GEMM FLOPs only: 6*T*K*H*I forward, 3x that forward+backward.
3. Decode tokens/s of a 4-layer full-width slice (qwen3-30b-a3b widths) at 32K context, dense (sdpa)
   and with DSA (keye-dsa's backend, when installed).

Usage: python bench_moe.py [--quick] [--out results.json]. ``--quick`` runs tiny shapes (CPU, Triton
interpreter) to check the script itself. Prints a table; writes every number to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

from keye_moe import DecoderConfig, KeyeMoeForCausalLM, KVCache, attention_backends
from keye_moe.experts.loop import loop_experts
from keye_moe.layers.moe import SparseMoeBlock
from keye_moe.model import _ExpertBackendTable

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def bench(fn, reps: int = 20) -> float:
    """Median milliseconds (CUDA events via triton.testing.do_bench on GPU)."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def num(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "n/a"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- correctness
def expert_case(n, k, e, h, i, dtype, seed, unused=()):
    g = torch.Generator(device="cpu").manual_seed(seed)
    allowed = torch.tensor([x for x in range(e) if x not in unused])
    scores = torch.rand(n, len(allowed), generator=g)
    ids = allowed[scores.topk(k, dim=-1).indices]
    tensors = [
        torch.randn(n, h, generator=g),
        torch.rand(n, k, generator=g),
        torch.randn(e, 2 * i, h, generator=g) / h**0.5,
        torch.randn(e, h, i, generator=g) / i**0.5,
    ]
    x, w, gu, dn = (t.to(DEV, dtype).requires_grad_() for t in tensors)
    grad = torch.randn(n, h, generator=g).to(DEV, dtype)
    return (x, ids.to(DEV), w, gu, dn), grad


def run_experts(fn, args, grad):
    x, ids, w, gu, dn = args
    for t in (x, w, gu, dn):
        t.grad = None
    out = fn(x, ids, w, gu, dn)
    out.backward(grad)
    return [out.detach()] + [t.grad.clone() for t in (x, w, gu, dn)]


def check_backends(table, shapes, dtype, results):
    names = ["out", "d_hidden", "d_weights", "d_gate_up", "d_down"]
    for label, (n, k, e, h, i, unused) in shapes.items():
        args, grad = expert_case(n, k, e, h, i, dtype, seed=n + e, unused=unused)
        ref = run_experts(loop_experts, args, grad)
        for name in ("grouped_mm", "triton"):
            try:
                got = run_experts(table[name], args, grad)
                errs = {what: rel(a, b) for what, a, b in zip(names, got, ref)}
            except Exception as exc:  # a backend unsupported here must not hide the others
                errs = {"error": f"{type(exc).__name__}: {exc}"}
            results.append({"check": label, "dtype": str(dtype), "backend": name, **errs})
            print(f"check {label:<22} {dtype!s:<15} {name:<11} " + " ".join(
                f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in errs.items()
            ), flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------- MoE block
def hf_blocks(t, h, e, k, i, dtype):
    """transformers' Qwen3MoeSparseMoeBlock for each experts implementation this version supports."""
    try:
        import transformers
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except Exception as exc:
        print(f"transformers unavailable: {exc}")
        return {}
    impls = ["eager"]
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        # batched_mm is left out: it materializes [T*K, 2I, H] weight copies (hundreds of GB here)
        impls += [name for name in ("grouped_mm",) if name in ALL_EXPERTS_FUNCTIONS]
    except Exception:
        pass
    blocks = {}
    for impl in impls:
        cfg = transformers.Qwen3MoeConfig(
            hidden_size=h, num_experts=e, num_experts_per_tok=k, moe_intermediate_size=i, norm_topk_prob=True
        )
        cfg._experts_implementation = None if impl == "eager" else impl
        block = Qwen3MoeSparseMoeBlock(cfg).to(DEV, dtype)
        blocks[f"transformers-{transformers.__version__}-{impl}"] = block
    return blocks


def time_block(name, forward, params, x, grad, flops, results):
    row = {"name": name}
    try:
        with torch.no_grad():
            row["fwd_ms"] = bench(lambda: forward(x))

        def fwd_bwd():
            for p in params:
                p.grad = None
            xx = x.detach().requires_grad_()
            forward(xx).backward(grad)

        row["fwd_bwd_ms"] = bench(fwd_bwd)
        row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
        row["fwd_bwd_tflops"] = 3 * flops / row["fwd_bwd_ms"] / 1e9
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    results.append(row)
    fwd = f"{num(row, 'fwd_ms', '8.3f')} ms {num(row, 'fwd_tflops', '7.1f')} TFLOP/s"
    both = f"{num(row, 'fwd_bwd_ms', '8.3f')} ms {num(row, 'fwd_bwd_tflops', '7.1f')} TFLOP/s"
    print(f"block {name:<36} fwd {fwd} | fwd+bwd {both} {row.get('error', '')}", flush=True)


def random_block(h, e, k, i, dtype):
    """A keye-moe MoE block of this shape with seeded N(0, 0.02) weights (near-uniform routing), and its
    expert backend table."""
    torch.manual_seed(0)
    cfg = DecoderConfig.preset(
        "tiny",
        hidden_size=h,
        num_experts=e,
        num_experts_per_tok=k,
        moe_intermediate_size=i,
        norm_topk_prob=True,
    )
    table = _ExpertBackendTable()
    block = SparseMoeBlock(cfg, table).to(DEV)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.02)
        block.experts.gate_up_proj.normal_(0, 0.02)
        block.experts.down_proj.normal_(0, 0.02)
    return block.to(dtype), table


def moe_block_bench(t, h, e, k, i, dtype, results, checks):
    block, table = random_block(h, e, k, i, dtype)
    x = torch.randn(1, t, h, device=DEV, dtype=dtype)
    grad = torch.randn(1, t, h, device=DEV, dtype=dtype)
    flops = 6 * t * k * h * i

    # correctness of the whole block against the loop reference, forward and backward, at this shape
    outs = {}
    for name in ("loop", "grouped_mm", "triton"):
        block.implementation = name
        try:
            block.zero_grad()
            xx = x.detach().requires_grad_()
            out = block(xx)[0]
            out.backward(grad)
            outs[name] = [out.detach(), xx.grad] + [p.grad.clone() for p in block.parameters()]
        except Exception as exc:
            checks.append({"check": "block", "backend": name, "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
    for name in ("grouped_mm", "triton"):
        if name in outs and "loop" in outs:
            what = ["out", "d_hidden", "d_router", "d_gate_up", "d_down"]
            errs = {w: rel(a, b) for w, a, b in zip(what, outs[name], outs["loop"])}
            checks.append({"check": f"block T={t}", "dtype": str(dtype), "backend": name, **errs})
            print(
                f"check block T={t:<14} {dtype!s:<15} {name:<11} "
                + " ".join(f"{k}={v:.2e}" for k, v in errs.items())
            )
    del outs

    for name in ("loop", "grouped_mm", "triton"):
        block.implementation = name
        time_block(
            f"keye-moe {name}", lambda inp: block(inp)[0], list(block.parameters()), x, grad, flops, results
        )
    for name, hf in hf_blocks(t, h, e, k, i, dtype).items():
        with torch.no_grad():  # same weights and router as ours
            hf.gate.weight.copy_(block.gate.weight)
            hf.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
            hf.experts.down_proj.copy_(block.experts.down_proj)
            ref = block(x)[0]
            block.implementation = "loop"
            err = rel(hf(x), block(x)[0])
        checks.append({"check": "transformers block vs keye loop", "backend": name, "out": err})
        print(f"check {name} vs keye loop: out={err:.2e}")
        del ref
        time_block(name, hf, list(hf.parameters()), x, grad, flops, results)
        del hf

    # where the block's time goes: the router alone, and each backend's experts call alone
    with torch.no_grad():
        flat = x.view(t, h)
        parts = {"router": bench(lambda: block.gate(flat))}
        ids, weights, _ = block.gate(flat)
        for name in ("grouped_mm", "triton"):
            fn = table[name]
            try:
                parts[f"experts {name}"] = bench(
                    lambda fn=fn: fn(flat, ids, weights, block.experts.gate_up_proj, block.experts.down_proj)
                )
            except Exception as exc:
                parts[f"experts {name}"] = f"{type(exc).__name__}: {exc}"
        if CUDA:  # the Triton experts' own steps
            from keye_moe.experts.triton import function as TF
            from keye_moe.experts.triton.plan import make_plan

            gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
            plan = make_plan(ids, e, TF.pick_block_m(ids.numel(), e))
            act = TF.gate_up_swiglu(flat, gate_up, plan, False)[0]
            y = TF.down_scatter(act, weights, down, plan)
            parts["triton plan"] = bench(lambda: make_plan(ids, e, plan.block_m))
            parts["triton gate_up+SwiGLU"] = bench(lambda: TF.gate_up_swiglu(flat, gate_up, plan, False))
            parts["triton down+weight+scatter"] = bench(lambda: TF.down_scatter(act, weights, down, plan))
            parts["triton slot sum"] = bench(lambda: TF.sum_slots(y, k))
            parts["torch sum of the same rows"] = bench(lambda: y.view(t, k, h).sum(1))
            del act, y
    results.append({"name": "forward parts (ms)", **parts})
    print(
        "parts "
        + " | ".join(f"{k} {v:.3f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in parts.items())
    )

    # ceiling: the two gathered grouped GEMMs alone, on pre-sorted rows
    if hasattr(torch.nn.functional, "grouped_mm"):
        from keye_moe.experts.routing import dispatch

        with torch.no_grad():
            ids = block.gate(x.view(t, h))[0]
            d = dispatch(ids, e)
            xs = x.view(t, h)[d.tokens].contiguous()
            act = torch.randn(t * k, i, device=DEV, dtype=dtype)
            w1 = block.experts.gate_up_proj.transpose(-2, -1)
            w2 = block.experts.down_proj.transpose(-2, -1)

            def gemms():
                torch.nn.functional.grouped_mm(xs, w1, offs=d.offsets)
                torch.nn.functional.grouped_mm(act, w2, offs=d.offsets)

            try:
                ms = bench(gemms)
                results.append(
                    {"name": "bare F.grouped_mm GEMMs", "fwd_ms": ms, "fwd_tflops": flops / ms / 1e9}
                )
                print(
                    f"block {'bare F.grouped_mm GEMMs':<36} fwd {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s"
                )
            except Exception as exc:
                print(f"bare grouped_mm failed: {exc}")


# ---------------------------------------------------------------------------------------------- decode
def decode_bench(preset, attn, layers, context, steps, batch, dtype, results, profile=False, **overrides):
    label = f"decode {preset} x{layers} {attn} ctx={context} B={batch}"
    row = {"name": label}
    try:
        cfg = DecoderConfig.preset(
            preset,
            num_hidden_layers=layers,
            attn_implementation=attn,
            expert_implementation="auto",
            **overrides,
        )
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(DEV):
                model = KeyeMoeForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(previous)
        prompt = torch.randint(0, cfg.vocab_size, (batch, context), device=DEV)
        with torch.no_grad():
            cache = KVCache(layers, capacity=context + steps + 8)
            sync()
            t0 = time.perf_counter()
            out = model(prompt, cache=cache, logits_to_keep=1, compute_aux_loss=False)
            sync()
            row["prefill_s"] = time.perf_counter() - t0
            tok = out.logits[:, -1].argmax(-1)
            for _ in range(3):
                tok = model(tok[:, None], cache=cache, compute_aux_loss=False).logits[:, -1].argmax(-1)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = model(tok[:, None], cache=cache, compute_aux_loss=False).logits[:, -1].argmax(-1)
            sync()
            dt = time.perf_counter() - t0
        row.update(step_ms=dt / steps * 1e3, tokens_per_s=batch * steps / dt)
        if profile:
            with torch.no_grad(), torch.profiler.profile() as prof:
                for _ in range(2):
                    tok = model(tok[:, None], cache=cache, compute_aux_loss=False).logits[:, -1].argmax(-1)
                sync()
            key = "self_cuda_time_total" if CUDA else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=8, max_name_column_width=60))
        del model, cache
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    results.append(row)
    print(
        f"{label:<58} prefill {num(row, 'prefill_s', '7.3f')} s | step {num(row, 'step_ms', '7.2f')} ms "
        f"| {num(row, 'tokens_per_s', '8.1f')} tok/s {row.get('error', '')}",
        flush=True,
    )


def sync():
    if CUDA:
        torch.cuda.synchronize()


def ensure_plugins() -> None:
    """Where the packages are only on PYTHONPATH (no entry points), register the plugins by hand."""
    from keye_moe import builtin_plugin, registry

    host = registry.plugin_host()
    if not host.manager.is_registered(builtin_plugin):
        host.register(builtin_plugin, name="keye-moe")
    try:
        import keye_dsa.plugin
    except ImportError:
        return
    if not host.manager.is_registered(keye_dsa.plugin):
        host.register(keye_dsa.plugin, name="dsa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script on the CPU")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_moe.json"))
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--decode-only", action="store_true", help="skip the checks and the MoE block")
    args = parser.parse_args()
    ensure_plugins()
    quick = args.quick or not CUDA
    dtype = torch.bfloat16 if CUDA else torch.float32
    report: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    checks: list = []
    blocks: list = []
    decode: list = []
    t0 = time.perf_counter()
    table = _ExpertBackendTable()
    small = {"awkward (zero-token experts)": (77, 3, 9, 80, 40, (2, 5))}
    check_backends(table, small, torch.float32, checks)
    if CUDA:
        check_backends(table, small, torch.bfloat16, checks)
    if quick:
        t, h, e, k, i = 256, 64, 8, 2, 32
    else:
        t, h, e, k, i = 16384, 2048, 128, 8, 768
    report["moe_shape"] = {
        "tokens": t,
        "hidden": h,
        "experts": e,
        "top_k": k,
        "expert_hidden": i,
        "dtype": str(dtype),
    }
    report.update(checks=checks, moe_block=blocks, decode=decode)

    def save() -> None:  # after every section, so a run cut short still leaves its numbers
        report["seconds"] = time.perf_counter() - t0
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    if not args.decode_only:
        moe_block_bench(t, h, e, k, i, dtype, blocks, checks)
    save()
    print(f"[{time.perf_counter() - t0:.0f}s] MoE block done", flush=True)
    if not args.skip_decode:
        if quick:
            kw = dict(layers=2, context=48, steps=4, batch=2, dtype=dtype)
            decode_bench("tiny", "sdpa", results=decode, profile=True, **kw)
            if "dsa" in attention_backends():
                sa = {"indexer_num_heads": 2, "indexer_head_dim": 16, "topk": 16}
                decode_bench("tiny", "dsa", results=decode, sa_config=sa, **kw)
        else:
            kw = dict(layers=4, context=32768, steps=32, dtype=dtype)
            for batch in (1, 8):
                decode_bench("qwen3-30b-a3b", "sdpa", batch=batch, results=decode, profile=batch == 1, **kw)
                save()
                if "dsa" in attention_backends():
                    decode_bench(
                        "keye-vl-2.0-30b-a3b", "dsa", batch=batch, results=decode, mrope_section=None, **kw
                    )
                else:
                    print("decode with DSA skipped: keye-dsa's 'dsa' backend is not installed")
    save()
    print(f"wrote {args.out} after {report['seconds']:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
