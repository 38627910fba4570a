"""FSDP2 (Lightning ModelParallelStrategy, per-layer fully_shard) on N GPUs against one GPU, same data.

One process with ``packs_per_batch = N`` sees exactly the packs that N FSDP2 ranks see with one each
(the data module's sampler guarantees it), and the loss is a token mean over all ranks, so the two runs
must log the same losses step by step. Runs ``keye-train fit`` twice on a text-only decoder config
(no video decoding needed), compares the CSV losses and reports step times.

Usage: python fsdp2_equal.py [--gpus 2] [--steps 6] [--out results.json]  (CPU: --cpu, gloo)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def write_data(path: Path, n: int = 512) -> None:
    rng = random.Random(0)
    words = ["red", "green", "blue", "square", "circle", "video", "frame", "time", "second", "moves"]
    with path.open("w") as handle:
        for i in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))
            record = {
                "messages": [{"role": "user", "content": f"{i}: {q}"}, {"role": "assistant", "content": a}]
            }
            handle.write(json.dumps(record) + "\n")


def config(root: Path, data: Path, devices: int, n_ranks: int, fsdp: bool, steps: int, cpu: bool) -> Path:
    """One process with ``n_ranks`` packs per step, or ``devices`` FSDP2 ranks with one pack each."""
    strategy = (
        {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
         "init_args": {"data_parallel_size": devices, "tensor_parallel_size": 1}}
        if fsdp else "auto"
    )  # fmt: skip
    overrides = {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                 "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
                 "moe_intermediate_size": 128}  # fmt: skip
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu" if cpu else "gpu", "devices": devices, "strategy": strategy,
            "precision": "32-true", "max_steps": steps, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "use_distributed_sampler": False, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "csv"}},
            "enable_checkpointing": False,
        },
        "model": {"class_path": "keye_train.training.KeyeLMTraining", "init_args": {
            "model": {"architecture": "decoder", "preset": "tiny", "overrides": overrides},
            "optimizer": {"lr": 1.0e-3, "schedule": "constant", "weight_decay": 0.0},
            "aux_loss_coef": 0.0, "grad_clip": 1.0}},
        "data": {"train": [{"path": str(data)}], "token_budget": 2048,
                 "packs_per_batch": 1 if fsdp else n_ranks, "num_workers": 2},
    }  # fmt: skip
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(cfg: Path) -> float:
    start = time.time()
    cmd = [sys.executable, "-m", "keye_train.cli", "fit", "--config", str(cfg)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-6000:])
        raise SystemExit(f"keye-train fit failed for {cfg}")
    return time.time() - start


def losses(root: Path) -> list[float]:
    rows = []
    for path in root.glob("csv/version_*/metrics.csv"):
        with path.open() as handle:
            rows += [r for r in csv.DictReader(handle) if r.get("train/lm_loss")]
    return [float(r["train/lm_loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU processes (checks the script)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "fsdp2_equal.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_data(tmp / "text.jsonl")
        one = tmp / "one"
        t_one = fit(config(one, tmp / "text.jsonl", 1, args.gpus, False, args.steps, args.cpu))
        many = tmp / "fsdp"
        t_many = fit(config(many, tmp / "text.jsonl", args.gpus, args.gpus, True, args.steps, args.cpu))
        a, b = losses(one), losses(many)
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if a and len(a) == len(b) else float("inf")
    result = {"devices": args.gpus, "steps": args.steps, "single": a, "fsdp2": b, "max_rel_diff": worst,
              "wall_s_single": t_one, "wall_s_fsdp2": t_many, "ok": worst < 1e-4}  # fmt: skip
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
