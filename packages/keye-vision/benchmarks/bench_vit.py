"""KeyeViT on the GPU: checks every attention backend against the reference, then times the ViT
packed vs padded on a mixed-resolution batch and against transformers' SiglipVisionModel.

Needs no video code (the GPU machine has no torchcodec). Writes JSON and prints a table:
    PYTHONPATH=packages/keye-vision/src python packages/keye-vision/benchmarks/bench_vit.py --out $OUT
CPU smoke run: ... bench_vit.py --preset tiny --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from keye_vision.attention import available_backends, reference_attention, varlen_attention
from keye_vision.config import VisionConfig
from keye_vision.image import smart_resize
from keye_vision.model import KeyeViT
from keye_vision.packing import pack_grid

PEAK_TFLOPS = 790.0  # dense bf16 matmul measured on the lent H200 (BENCHMARKS.md header)
# A mixed-resolution batch: photos, screenshots, documents, a panorama (pixels before smart_resize).
MIXED = [
    (224, 224),
    (336, 448),
    (448, 336),
    (512, 512),
    (640, 480),
    (768, 1024),
    (1024, 768),
    (896, 896),
    (384, 1152),
    (1280, 720),
    (300, 300),
    (720, 1280),
    (480, 640),
    (560, 560),
    (1024, 1024),
    (256, 512),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on the GPU, a host clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def vit_flops(cfg: VisionConfig, lengths: list[int], padded_to: int | None = None) -> float:
    """Forward matmul FLOPs: linears on every token, attention within each item."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    tokens = sum(lengths) if padded_to is None else padded_to * len(lengths)
    attn = sum(n * n for n in lengths) if padded_to is None else len(lengths) * padded_to**2
    per_layer = 2 * tokens * (4 * d * d + 2 * d * i) + 4 * attn * d
    return cfg.num_hidden_layers * per_layer + 2 * tokens * d * 3 * cfg.patch_size**2


def check_backends(device: torch.device, dtype: torch.dtype, results: dict) -> None:
    """Each backend vs the fp32 reference on fresh random packed inputs, forward and backward."""
    lengths = [64, 729, 17, 256, 1024] if device.type == "cuda" else [5, 17, 9]
    for backend in available_backends(device):
        if backend == "reference":
            continue
        for dt in (dtype, torch.float32):
            if backend in ("torch_varlen", "flash") and dt == torch.float32:
                continue  # fp16/bf16 kernels only
            g = torch.Generator().manual_seed(len(results["checks"]))
            cu = torch.tensor(
                [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device
            )
            q, k, v = (
                torch.randn(sum(lengths), 16, 72, generator=g).to(device, dt).requires_grad_()
                for _ in range(3)
            )
            out = varlen_attention(q, k, v, cu, max(lengths), backend)
            grad = torch.randn_like(out)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
            q32, k32, v32 = (x.detach().double().requires_grad_() for x in (q, k, v))
            ref = reference_attention(q32, k32, v32, cu, max(lengths))
            rq, rk, rv = torch.autograd.grad(ref, (q32, k32, v32), grad.double())
            row = {
                "backend": backend,
                "dtype": str(dt).split(".")[-1],
                "out": rel(out, ref),
                "dq": rel(dq, rq),
                "dk": rel(dk, rk),
                "dv": rel(dv, rv),
            }
            row["ok"] = max(row[n] for n in ("out", "dq", "dk", "dv")) < (
                1e-5 if dt == torch.float32 else 1e-2
            )
            results["checks"].append(row)
            print(json.dumps(row), flush=True)


def padded_forward(model: KeyeViT, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The same ViT on a padded [B, L_max] batch with a key-padding mask (what packing avoids)."""
    packed = pack_grid(grid, pixels.device)
    x = model.embeddings(pixels, packed)
    cos, sin = model.rope(packed)
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).long()
    b, length = lengths.numel(), packed.max_seqlen
    item = torch.repeat_interleave(torch.arange(b, device=x.device), lengths)
    pos = torch.arange(x.shape[0], device=x.device) - packed.cu_seqlens[:-1].long()[item]
    xp = x.new_zeros(b, length, x.shape[-1])
    xp[item, pos] = x
    cp, sp = cos.new_ones(b, length, *cos.shape[1:]), sin.new_zeros(b, length, *sin.shape[1:])
    cp[item, pos], sp[item, pos] = cos, sin
    mask = (torch.arange(length, device=x.device)[None] < lengths[:, None])[:, None, None, :]

    def attend(q, k, v):
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return o.transpose(1, 2)

    for layer in model.encoder.layers:
        xp = layer(xp, (cp, sp), attend)
    return model.post_layernorm(xp)[item, pos]


def batch(sizes, cfg: VisionConfig, device, dtype):
    grids = [(1, h // cfg.patch_size, w // cfg.patch_size) for h, w in sizes]
    grid = torch.tensor(grids, dtype=torch.long)
    total = int(grid.prod(-1).sum())
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(total, 3 * cfg.patch_size**2, generator=g).mul(2).sub(1).to(device, dtype)
    return pixels, grid, [h * w for _, h, w in grids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="siglip-so400m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny batch, few repetitions (CPU smoke run)")
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--out", default="outputs")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup, reps = (1, 2) if args.quick else (3, 10)
    results: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "preset": args.preset,
        "dtype": str(dtype),
        "backends": available_backends(device),
        "checks": [],
        "timings": [],
    }
    print(json.dumps({k: results[k] for k in ("torch", "device", "backends")}), flush=True)
    check_backends(device, dtype, results)

    cfg = VisionConfig.preset(args.preset)
    torch.manual_seed(0)
    model = KeyeViT(cfg).to(device, dtype).eval()
    sizes = [smart_resize(h, w) for h, w in (MIXED[:4] if args.quick else MIXED)]
    if args.quick:
        sizes = [(28 * (1 + i % 3), 28 * (2 + i % 2)) for i in range(4)]
    pixels, grid, lengths = batch(sizes, cfg, device, dtype)
    longest = max(lengths)

    with torch.no_grad():
        # Model-level agreement: packed fast path, padded, and the fp32 SDPA path.
        fast = model(pixels, grid)
        pad = padded_forward(model, pixels, grid)
        ref = model.float()(pixels.float(), grid, attn_backend="sdpa")
        model.to(dtype)
        agree = {"packed_vs_fp32": rel(fast, ref), "padded_vs_fp32": rel(pad, ref)}
        results["model_agreement"] = agree
        print(json.dumps(agree), flush=True)

        def add(name, ms, flops, items, tokens):
            row = {
                "name": name,
                "ms": ms,
                "items_per_s": items / ms * 1e3,
                "tokens_per_s": tokens / ms * 1e3,
                "useful_tflops": flops / ms / 1e9,
                "roofline": flops / ms / 1e9 / PEAK_TFLOPS,
            }
            results["timings"].append(row)
            print(json.dumps(row), flush=True)
            return row

        useful = vit_flops(cfg, lengths)
        n, t = len(lengths), sum(lengths)
        packed = add(
            "mixed: packed (auto backend)",
            timed(lambda: model(pixels, grid), device, warmup, reps),
            useful,
            n,
            t,
        )
        sdpa_ms = timed(lambda: model(pixels, grid, attn_backend="sdpa"), device, warmup, reps)
        add("mixed: packed (sdpa per length)", sdpa_ms, useful, n, t)
        padded_ms = timed(lambda: padded_forward(model, pixels, grid), device, warmup, reps)
        padded = add("mixed: padded (SDPA + mask)", padded_ms, useful, n, t)
        results["packed_over_padded"] = padded["ms"] / packed["ms"]
        results["mixed_batch"] = {"images": n, "tokens": t, "longest": longest, "padded_tokens": n * longest}

    # Training step shape: forward + backward, packed vs padded, on the first half of the batch.
    half = len(sizes) // 2
    hp, hg, hl = batch(sizes[:half], cfg, device, dtype)
    model.train()
    for name, fn in (
        ("fwd+bwd packed", lambda: model(hp, hg).float().square().mean().backward()),
        ("fwd+bwd padded", lambda: padded_forward(model, hp, hg).float().square().mean().backward()),
    ):
        add_row = {"name": f"mixed/2: {name}", "ms": timed(fn, device, warmup, reps)}
        add_row["tokens_per_s"] = sum(hl) / add_row["ms"] * 1e3
        add_row["useful_tflops"] = 3 * vit_flops(cfg, hl) / add_row["ms"] / 1e9
        add_row["roofline"] = add_row["useful_tflops"] / PEAK_TFLOPS
        results["timings"].append(add_row)
        print(json.dumps(add_row), flush=True)
    model.zero_grad(set_to_none=True)
    model.eval()

    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        side = cfg.image_size
        count = 4 if args.quick else args.hf_batch
        hf_cfg = transformers.SiglipVisionConfig(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            image_size=side,
            patch_size=cfg.patch_size,
            hidden_act=cfg.hidden_act,
            layer_norm_eps=cfg.layer_norm_eps,
            vision_use_head=False,
        )
        hf_cfg._attn_implementation = "sdpa"
        hf = transformers.SiglipVisionModel(hf_cfg).to(device, dtype).eval()
        images = torch.randn(count, 3, side, side, device=device, dtype=dtype)
        grid_side = side // cfg.patch_size
        sq_pixels, sq_grid, sq_lengths = batch(
            [(grid_side * cfg.patch_size,) * 2] * count, cfg, device, dtype
        )
        flops = vit_flops(cfg, sq_lengths)
        tokens = sum(sq_lengths)
        with torch.no_grad():
            hf_row = add_hf = {
                "name": f"{count} x {side}px: transformers SiglipVisionModel (sdpa)",
                "ms": timed(lambda: hf(pixel_values=images), device, warmup, reps),
            }
            ours = {
                "name": f"{count} x {side}px: KeyeViT packed (auto, RoPE on)",
                "ms": timed(lambda: model(sq_pixels, sq_grid), device, warmup, reps),
            }
        for row in (add_hf, ours):
            row.update(
                items_per_s=count / row["ms"] * 1e3,
                tokens_per_s=tokens / row["ms"] * 1e3,
                useful_tflops=flops / row["ms"] / 1e9,
                roofline=flops / row["ms"] / 1e9 / PEAK_TFLOPS,
            )
            results["timings"].append(row)
            print(json.dumps(row), flush=True)
        results["keye_over_hf"] = hf_row["ms"] / ours["ms"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_vit.json").write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']}, torch {results['torch']}, {args.preset}, {dtype}")
    print(f"{'case':<58} {'ms':>9} {'items/s':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'roofline':>8}")
    for r in results["timings"]:
        items = f"{r['items_per_s']:.1f}" if "items_per_s" in r else "-"
        speed = f"{r['tokens_per_s']:>11.0f} {r['useful_tflops']:>8.1f} {r['roofline']:>8.1%}"
        print(f"{r['name']:<58} {r['ms']:>9.2f} {items:>9} {speed}")
    print(f"packed / padded speedup: {results['packed_over_padded']:.2f}x", end="")
    print(f"; KeyeViT / HF speedup: {results['keye_over_hf']:.2f}x" if "keye_over_hf" in results else "")
    print(
        "checks:",
        "all ok" if all(c["ok"] for c in results["checks"]) else "FAILED",
        results["model_agreement"],
    )


if __name__ == "__main__":
    main()
