"""Training-step throughput of a full-width Qwen3-30B-A3B / Keye-VL-2.0 slice (issue 7 §6), correctness first.

The slice: 4 decoder layers at full width (hidden 2048, 32 query / 4 KV heads, 128 experts, 8 active,
expert hidden 768, vocabulary 151936), one packed batch of 32K tokens (8 sequences of 4096), bf16 weights,
AdamW. One step is forward, next-token loss, backward and the optimizer step: exactly what a
keye-train LightningModule does per batch, without Lightning's bookkeeping.

Variants, all measured in the same run on the same weights:
- ``keye dsa-sparse``: keye-moe with keye-dsa's backend in sparse-adaptation mode (top-2048 sparse
  attention, indexer trained on the sparse KL), the stage this slice would train in;
- ``keye dense``: keye-moe with SDPA attention (stages 0-3);
- ``transformers``: ``Qwen3MoeForCausalLM`` of the installed transformers, each experts implementation it
  offers, on the same tokens as a ``[8, 4096]`` batch (no padding: the same attention work as packing).

Correctness before timing: the keye dense slice and the transformers slice give the same loss on the same
weights and tokens, and DSA equals dense attention when every sequence is no longer than top-k.
Tokens/s is 32768 / median step time. MFU counts the dense model's FLOPs for every variant
(6 x active matmul parameters + 6 x causal attention per token) against 989 TFLOP/s (H200 dense bf16), so
MFU ratios equal throughput ratios.

Usage: python bench_train_step.py [--quick] [--out results.json]; ``--quick`` runs tiny widths on CPU.
On the lent GPU (packages on PYTHONPATH, no install):
    PYTHONPATH=packages/keye-moe/src:packages/keye-dsa/src:packages/keye-train/src:packages/keye-vision/src \
        python packages/keye-train/benchmarks/bench_train_step.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

from keye_moe import DecoderConfig, KeyeMoeForCausalLM
from keye_moe.checkpoint import export_tensors
from keye_train.training.losses import shifted_ce_sum

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
PEAK_TFLOPS = 989.0  # H200 SXM dense bf16, datasheet


def slice_config(quick: bool) -> DecoderConfig:
    if quick:
        return DecoderConfig.preset(
            "tiny",
            num_hidden_layers=2,
            sa_config={"indexer_num_heads": 2, "indexer_head_dim": 16, "topk": 32},
        )
    return DecoderConfig.preset("keye-vl-2.0-30b-a3b", num_hidden_layers=4, mrope_section=None)


def flops_per_token(cfg: DecoderConfig, seq: int) -> float:
    """Dense-model training FLOPs per token: 6 x active matmul parameters + causal attention."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * cfg.num_attention_heads * d * 2 + h * cfg.num_key_value_heads * d * 2
    experts = cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size + h * cfg.num_experts
    # causal attention: QK and PV, 2 FLOPs per multiply-add, average context seq / 2, x3 for training
    per_layer = 6 * (attn + experts) + 3 * 4 * cfg.num_attention_heads * d * seq / 2
    return cfg.num_hidden_layers * per_layer + 6 * h * cfg.vocab_size


def build_keye(cfg: DecoderConfig, attn: str, state: dict | None, dtype: torch.dtype) -> KeyeMoeForCausalLM:
    torch.manual_seed(0)
    with torch.device(DEV):  # initialized where it runs: no 3B-parameter CPU init and copy
        model = KeyeMoeForCausalLM(cfg.replace(attn_implementation=attn)).to(dtype)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not missing and all("sa_indexer" in k for k in unexpected), (missing, unexpected)
    return model


def build_hf(cfg: DecoderConfig, impl: str, state: dict, dtype: torch.dtype):
    import transformers

    hf_cfg = transformers.Qwen3MoeConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "sa_config"})
    hf_cfg._experts_implementation = None if impl == "eager" else impl
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(DEV):
        model = transformers.Qwen3MoeForCausalLM(hf_cfg).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if "sa_indexer" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def hf_impls() -> list[str]:
    impls = ["eager"]
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        impls += [n for n in ("grouped_mm",) if n in ALL_EXPERTS_FUNCTIONS]
    except Exception:
        pass
    return impls[::-1]  # the fastest first: the loop over 128 experts ("eager") is slowest


def batch(cfg: DecoderConfig, n_seq: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (n_seq, seq), generator=g).to(DEV)
    cu = torch.arange(0, n_seq + 1, dtype=torch.int32, device=DEV) * seq
    positions = torch.arange(seq, device=DEV).repeat(n_seq)[None]
    return {"ids": ids, "cu": cu, "positions": positions}


def keye_loss(model, data, with_kl: bool) -> torch.Tensor:
    ids = data["ids"].reshape(1, -1)
    labels = ids.clone()
    labels[0, data["cu"][:-1].long()] = -100  # no sequence predicts across a boundary
    out = model(ids, position_ids=data["positions"], cu_seqlens=data["cu"])
    total, count = shifted_ce_sum(out.logits, labels)
    loss = total / count
    if with_kl:
        loss = loss + out.aux_losses["indexer_kl"]
    return loss


def hf_loss(model, data) -> torch.Tensor:
    out = model(input_ids=data["ids"], use_cache=False)
    total, count = shifted_ce_sum(out.logits, data["ids"])
    return total / count


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def time_steps(loss_fn, model, reps: int) -> float:
    """Median seconds of one training step (forward, loss, backward, AdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=CUDA)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        if CUDA:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ensure_plugins() -> None:
    """Where the packages are only on PYTHONPATH (no entry points), register the plugins by hand."""
    import keye_dsa.plugin
    from keye_moe import builtin_plugin, registry

    host = registry.plugin_host()
    for module, name in ((builtin_plugin, "keye-moe"), (keye_dsa.plugin, "dsa")):
        if not host.manager.is_registered(module):
            host.register(module, name=name)


def free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths on CPU (checks the script)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_train_step.json"))
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    import keye_dsa

    ensure_plugins()
    cfg = slice_config(args.quick)
    dtype = torch.bfloat16 if CUDA else torch.float32
    n_seq, seq = (2, 64) if args.quick else (8, 4096)
    results: dict = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
                     "slice": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                               "experts": cfg.num_experts, "tokens": n_seq * seq, "seq": seq,
                               "topk": cfg.sa_config["topk"]}, "checks": [], "rows": []}  # fmt: skip
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        results["transformers"] = None

    # one set of weights for every variant (keye's fused expert layout is transformers v5's)
    keye = build_keye(cfg, "dsa", None, dtype)
    state = {k: v.detach().clone() for k, v in export_tensors(keye, "fused")}
    del keye
    free()

    # ---------------------------------------------------------------- correctness
    short = batch(cfg, 2, min(seq, cfg.sa_config["topk"]), seed=2)
    with torch.no_grad():
        dense = build_keye(cfg, "sdpa", state, dtype)
        ref = float(keye_loss(dense, short, False))
        del dense
        dsa = build_keye(cfg, "dsa", state, dtype)
        keye_dsa.set_dsa_mode(dsa, "sparse")
        got = float(keye_loss(dsa, short, False))
        results["checks"].append({"check": "dsa == dense when seq <= topk", "loss": got, "dense": ref,
                                  "rel": rel(got, ref)})  # fmt: skip
        del dsa
        if results["transformers"]:
            hf = build_hf(cfg, "eager", state, dtype)
            got = float(hf_loss(hf, {"ids": short["ids"]}))
            results["checks"].append({"check": "transformers == keye dense", "loss": got, "dense": ref,
                                      "rel": rel(got, ref)})  # fmt: skip
            del hf
    free()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for c in results["checks"]:
        c["ok"] = c["rel"] < tol
        print(f"check {c['check']:<32} loss {c['loss']:.5f} vs {c['dense']:.5f}  rel {c['rel']:.1e}  "
              f"{'ok' if c['ok'] else 'FAILED'}", flush=True)  # fmt: skip

    # ---------------------------------------------------------------- timing
    data = batch(cfg, n_seq, seq)
    flops = flops_per_token(cfg, seq)
    variants = [
        (f"keye dsa-sparse (top-{cfg.sa_config['topk']})", "keye", "dsa"),
        ("keye dense sdpa", "keye", "sdpa"),
    ]
    if results["transformers"]:
        variants += [(f"transformers {results['transformers']} {impl}", "hf", impl) for impl in hf_impls()]
    for name, kind, impl in variants:
        row = {"name": name}
        try:
            if kind == "keye":
                model = build_keye(cfg, impl, state, dtype)
                if impl == "dsa":
                    keye_dsa.set_dsa_mode(model, "sparse")
                step_s = time_steps(
                    lambda m=model, sparse=impl == "dsa": keye_loss(m, data, sparse), model, args.reps
                )
            else:
                model = build_hf(cfg, impl, state, dtype)
                step_s = time_steps(lambda m=model: hf_loss(m, data), model, args.reps)
            row["step_ms"] = step_s * 1e3
            row["tokens_per_s"] = n_seq * seq / step_s
            row["mfu"] = flops * row["tokens_per_s"] / (PEAK_TFLOPS * 1e12)
            if CUDA:
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            del model
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        free()
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as handle:  # after every row: a time limit keeps what was measured
            json.dump(results, handle, indent=1)

    base = next(
        (r for r in results["rows"] if r["name"].startswith("transformers") and "tokens_per_s" in r), None
    )
    print(f"\n{'variant':44s} {'step ms':>9s} {'tokens/s':>10s} {'MFU':>6s} {'vs HF':>6s} {'mem GB':>7s}")
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['name']:44s} error: {r['error'][:80]}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{r['name']:44s} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} {r['mfu']:6.1%} {ratio:6.2f} "
              f"{r.get('peak_mem_gb', 0):7.1f}")  # fmt: skip
    results["flops_per_token"] = flops
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    return 0 if all(c["ok"] for c in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
