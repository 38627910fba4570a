"""The Qwen3 chat template, rendered in Python so every piece knows whether it is trained on.

Why not Jinja: the processor needs, for each character, whether it belongs to an assistant turn (the
labels) and where each image or video goes (the pad-token expansion). Rendering to a list of pieces
keeps both facts exact; joining the pieces gives the same text as Qwen3's released Jinja template
(system, user, assistant and tool turns; tools in the system prompt; Hermes ``<tool_call>`` blocks;
``<think>`` reasoning kept only after the last user query; an empty think block when thinking is off).

Messages use the OpenAI chat format. ``content`` is a string or a list of parts:
``{"type": "text", "text": ...}``, ``{"type": "image", "image": <path | PIL | tensor>, ...options}``,
``{"type": "video", "video": <path>, ...options}``; OpenAI's ``{"type": "image_url", "image_url": {"url":
...}}`` is read as an image (paths, ``file://`` and ``data:`` URLs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)


@dataclass
class TextPiece:
    text: str
    trainable: bool = False


@dataclass
class MediaPiece:
    """An image or video part, expanded into vision tokens by the processor."""

    kind: str  # "image" | "video"
    part: dict[str, Any] = field(default_factory=dict)


Piece = TextPiece | MediaPiece


def to_json(value: Any) -> str:
    """Jinja's ``tojson`` as Hugging Face chat templates define it (non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def _parts(message: Mapping[str, Any], index: int) -> list[dict[str, Any]]:
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence):
        raise TypeError(f"messages[{index}].content must be a string or a list of parts; got {type(content)}")
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if isinstance(part, Mapping) and part.get("type") == "image_url":  # the OpenAI form
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            part = {"type": "image", "image": url}
        if not isinstance(part, Mapping) or part.get("type") not in ("text", "image", "video"):
            raise ValueError(
                f"messages[{index}].content[{j}] must be a dict with type 'text', 'image', 'image_url' or "
                f"'video'; got {part!r:.120}"
            )
        if part["type"] != "text" and part.get(part["type"]) is None:
            raise ValueError(
                f"messages[{index}].content[{j}] is a {part['type']} part without a {part['type']!r} value"
            )
        parts.append(dict(part))
    return parts


def _text_only(message: Mapping[str, Any], index: int) -> str:
    parts = _parts(message, index)
    media = [p["type"] for p in parts if p["type"] != "text"]
    if media:
        raise ValueError(
            f"messages[{index}] ({message['role']}) may hold only text; found {media} "
            "(images and videos go in user turns)"
        )
    return "".join(p["text"] for p in parts)


def _user_pieces(message: Mapping[str, Any], index: int) -> list[Piece]:
    pieces: list[Piece] = []
    for part in _parts(message, index):
        if part["type"] == "text":
            pieces.append(TextPiece(part["text"]))
        else:
            pieces.append(MediaPiece(part["type"], part))
    return pieces


def _split_reasoning(message: Mapping[str, Any], content: str) -> tuple[str, str]:
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return content, reasoning
    if "</think>" in content:
        pieces = content.split("</think>")
        return pieces[-1].lstrip("\n"), pieces[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return content, ""


def render_tool_call(call: Mapping[str, Any]) -> str:
    """One Hermes-style call: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""
    function = call.get("function", call)
    if "name" not in function:
        raise ValueError(f"a tool call needs a 'name'; got {call!r:.120}")
    arguments = function.get("arguments", {})
    args = arguments if isinstance(arguments, str) else to_json(arguments)
    return '<tool_call>\n{"name": "' + str(function["name"]) + '", "arguments": ' + args + "}\n</tool_call>"


def _last_query_index(messages: Sequence[Mapping[str, Any]]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message["role"] == "user":
            content = message.get("content")
            if not (
                isinstance(content, str)
                and content.startswith("<tool_response>")
                and content.endswith("</tool_response>")
            ):
                return index
    return len(messages) - 1


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> list[Piece]:
    """Render ``messages`` as Qwen3 does, split into pieces that say what is trained on.

    An assistant turn's trainable span is everything after ``<|im_start|>assistant\\n`` up to and
    including its ``<|im_end|>``; every other character is context.
    """
    if not messages:
        raise ValueError("messages is empty; a chat needs at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise ValueError(f"messages[{index}] must be a dict with a role in {ROLES}; got {message!r:.120}")

    pieces: list[Piece] = []
    first_is_system = messages[0]["role"] == "system"
    if tools:
        head = "<|im_start|>system\n"
        if first_is_system:
            head += _text_only(messages[0], 0) + "\n\n"
        head += TOOLS_PREAMBLE + "".join("\n" + to_json(tool) for tool in tools) + TOOLS_POSTAMBLE
        pieces.append(TextPiece(head + "<|im_end|>\n"))
    elif first_is_system:
        pieces.append(TextPiece("<|im_start|>system\n" + _text_only(messages[0], 0) + "<|im_end|>\n"))

    last_query = _last_query_index(messages)
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system" and index == 0:
            continue
        if role in ("user", "system"):
            body = _user_pieces(message, index) if role == "user" else [TextPiece(_text_only(message, index))]
            pieces += [TextPiece(f"<|im_start|>{role}\n"), *body, TextPiece("<|im_end|>\n")]
        elif role == "assistant":
            content, reasoning = _split_reasoning(message, _text_only(message, index))
            is_last = index == len(messages) - 1
            if index > last_query and (is_last or reasoning):
                body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
            else:
                body = content
            for n, call in enumerate(message.get("tool_calls") or ()):
                if n > 0 or content:
                    body += "\n"
                body += render_tool_call(call)
            pieces += [
                TextPiece("<|im_start|>assistant\n"),
                TextPiece(body + "<|im_end|>", trainable=True),
                TextPiece("\n"),
            ]
        else:  # tool results are grouped into one user turn
            text = ""
            if index == 0 or messages[index - 1]["role"] != "tool":
                text += "<|im_start|>user"
            text += "\n<tool_response>\n" + _text_only(message, index) + "\n</tool_response>"
            if index == len(messages) - 1 or messages[index + 1]["role"] != "tool":
                text += "<|im_end|>\n"
            pieces.append(TextPiece(text))
    if add_generation_prompt:
        prompt = "<|im_start|>assistant\n"
        if not enable_thinking:
            prompt += "<think>\n\n</think>\n\n"
        pieces.append(TextPiece(prompt))
    return _merge(pieces)


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Join neighbouring text pieces with the same trainability (shorter, same text)."""
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, TextPiece) and not piece.text:
            continue
        last = merged[-1] if merged else None
        if isinstance(piece, TextPiece) and isinstance(last, TextPiece) and last.trainable == piece.trainable:
            merged[-1] = TextPiece(last.text + piece.text, piece.trainable)
        else:
            merged.append(piece)
    return merged


def chat_text(pieces: Sequence[Piece], image_placeholder: str, video_placeholder: str) -> str:
    """The rendered text, each image or video shown as the given placeholder (for display and tests)."""
    out = []
    for piece in pieces:
        if isinstance(piece, TextPiece):
            out.append(piece.text)
        else:
            out.append(image_placeholder if piece.kind == "image" else video_placeholder)
    return "".join(out)
