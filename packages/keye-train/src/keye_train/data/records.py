"""JSONL chat records: one ``{"messages": [...]}`` object per line, validated before any decoding.

A message is ``{"role": "system"|"user"|"assistant"|"tool", "content": str | [part, ...]}``; a part is
``{"type": "text", "text": ...}``, ``{"type": "image", "image": path, ...options}`` or
``{"type": "video", "video": path, ...options}``. Relative media paths resolve against the JSONL file's
folder so a data set can be moved as a whole. Records are read by byte offset so that worker processes
open the file themselves and a million-line file is never held in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "image", "video")


class RecordError(ValueError):
    """A record that cannot become a training sample; ``where`` names its file and line."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One validated chat record and where it came from."""

    messages: list[dict[str, Any]]
    where: str  # "file.jsonl:LINE" (1-based line)
    extra: dict[str, Any]  # every other top-level field (e.g. "num_tokens", "id")

    def media_paths(self) -> list[str]:
        return [part[part["type"]] for part in self.parts() if part["type"] in ("image", "video")]

    def parts(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for message in self.messages:
            content = message["content"]
            if isinstance(content, list):
                out.extend(content)
        return out


def _check_part(part: Any, where: str, base: Path) -> dict[str, Any]:
    if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
        raise RecordError(where, f"a content part must be an object with type in {PART_TYPES}; got {part!r}")
    kind = part["type"]
    value = part.get(kind)
    if not isinstance(value, str) or not value:
        raise RecordError(where, f"a {kind} part needs a non-empty string field {kind!r}; got {part!r}")
    if kind == "text":
        return part
    path = Path(value)
    if not path.is_absolute():
        path = base / path
    return {**part, kind: str(path)}


def parse_record(line: str, where: str, base: Path) -> Record:
    """Validate one JSONL line; every problem raises ``RecordError`` naming the line and the fault."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(where, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise RecordError(where, 'expected an object with a non-empty "messages" list')
    messages = []
    for i, message in enumerate(obj["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RecordError(where, f"message {i} must be an object with role in {ROLES}; got {message!r}")
        content = message.get("content")
        if isinstance(content, list):
            content = [_check_part(part, where, base) for part in content]
        elif not isinstance(content, str):
            raise RecordError(where, f"message {i} content must be a string or a list of parts")
        messages.append({**message, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(where, "no assistant message: nothing to learn from")
    extra = {k: v for k, v in obj.items() if k != "messages"}
    return Record(messages=messages, where=where, extra=extra)


class JsonlFile:
    """Random access to the non-blank lines of a JSONL file by byte offset."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data source {self.path} does not exist")
        self.offsets: list[int] = []
        self.lines: list[int] = []  # 1-based line number of each record
        with self.path.open("rb") as handle:
            offset = 0
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    self.offsets.append(offset)
                    self.lines.append(number)
                offset += len(raw)

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"

    def read(self, index: int) -> Record:
        with self.path.open("rb") as handle:
            handle.seek(self.offsets[index])
            raw = handle.readline()
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RecordError(self.where(index), "not UTF-8 text") from None
        return parse_record(line, self.where(index), self.path.parent)
