"""A byte-level text encoder for data-pipeline tests that must not depend on the model or processor."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class ByteEncoder:
    """Each message rendered as ``role: text`` bytes; labels on assistant bytes only; packed collation."""

    def encode(self, messages):
        ids, labels = [], []
        for m in messages:
            content = m["content"]
            text = content if isinstance(content, str) else "".join(p.get("text", "#") for p in content)
            chunk = list(f"{m['role']}: {text}\n".encode())
            ids += chunk
            labels += chunk if m["role"] == "assistant" else [-100] * len(chunk)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    def collate(self, samples):
        lengths = [len(s["input_ids"]) for s in samples]
        cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        positions = torch.cat([torch.arange(n) for n in lengths]).expand(3, -1)[:, None, :]
        return {
            "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
            "labels": torch.cat([s["labels"] for s in samples])[None],
            "position_ids": positions.contiguous(),
            "cu_seqlens": cu,
        }


def chat(question: str, answer: str, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        **extra,
    }


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def demo_data(folder: Path, train: int = 6) -> dict[str, Path]:
    """A small temporal-grounding set in the layout the tiny configs read (``outputs/demo/data``)."""
    import temporal_grounding

    files = temporal_grounding.write_dataset(folder, train=train, val=2, test=2, seed=0)
    return {**files, "_dir": folder}


def stage_config(stage: str, data: dict[str, Path], out: Path, **changes) -> Path:
    """The tiny config of ``stage`` pointed at ``data`` and ``out``, started from the tiny preset (no
    earlier stage's export), with ``changes`` applied as dotted keys (``"trainer.max_steps": 4``)."""
    import yaml

    config = yaml.safe_load((CONFIGS / "tiny" / f"{stage}.yaml").read_text())
    text = json.dumps(config)
    text = text.replace(f"outputs/tiny/{stage}", str(out)).replace(
        "outputs/demo/data/", str(data["_dir"]) + "/"
    )
    config = json.loads(text)
    config["model"]["init_args"]["model"] = {"preset": "tiny"}
    config["data"]["cache_dir"] = str(out / "token_counts")
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("RichProgressBar")
    ]
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["enable_model_summary"] = False
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path = out / f"{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def metrics(out: Path, column: str, version: str = "*") -> list[float]:
    """One value per logged step of ``column`` from the CSV logger of a run in ``out``."""
    import csv

    rows = []
    for path in sorted(out.glob(f"csv/version_{version}/metrics.csv")):
        with path.open() as handle:
            rows += [r for r in csv.DictReader(handle) if r.get(column)]
    return [float(r[column]) for r in sorted(rows, key=lambda r: int(r["step"]))]
