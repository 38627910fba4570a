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
