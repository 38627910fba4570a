"""Tool calls in the Hermes / Qwen3 text form, rendered for a prompt and parsed back from model text.

Why a hand-written parser: model text is untrusted. Several calls per turn, a final tag the model never
closed, stray prose between calls, code fences and invalid JSON all occur in practice; each bad call
becomes a structured error the agent loop feeds back to the model, and parsing never raises.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
THINK_CLOSE = "</think>"
_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)
JSON_DECODER = json.JSONDecoder(strict=False)  # models often put raw newlines inside strings


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    """One call: the tool's name and its arguments as a dict (the id only pairs it with its result)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id, compare=False)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI chat form: arguments travel as a JSON string."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass
class ToolCallError:
    """A call the model tried to make but got wrong; ``message`` is written for the model to read."""

    raw: str
    message: str


@dataclass
class ParsedReply:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    reasoning: str = ""


def _call_from_object(obj: Any) -> ToolCall:
    """Validate one decoded call object; raises ValueError with a message meant for the model."""
    if not isinstance(obj, dict):
        raise ValueError(f"a tool call must be a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError('a tool call needs a non-empty string "name"')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = JSON_DECODER.decode(args) if args.strip() else {}
        except (ValueError, RecursionError) as exc:
            raise ValueError(f'"arguments" of {name!r} is a string that is not valid JSON: {exc}') from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f'"arguments" of {name!r} must be a JSON object, got {type(args).__name__}')
    return ToolCall(name.strip(), args)


def _parse_body(body: str) -> ToolCall:
    text = body.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    if not text:
        raise ValueError("the <tool_call> block is empty")
    try:
        obj = JSON_DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the <tool_call> body is not valid JSON ({exc})") from None
    return _call_from_object(obj)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def parse_tool_calls(text: str) -> ParsedReply:
    """Split model text into prose (``.content``), well-formed calls and errors; never raises on text.

    Text before a final ``</think>`` is reasoning and is never searched for calls. A call's JSON is
    decoded in place, so an argument string may itself contain ``</tool_call>``.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_tool_calls expects the model's text as str, got {type(text).__name__}")
    reasoning = ""
    cut = text.rfind(THINK_CLOSE)
    if cut >= 0:
        reasoning = text[:cut].replace("<think>", "", 1).strip()
        text = text[cut + len(THINK_CLOSE) :]
    prose: list[str] = []
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            prose.append(text[pos:])
            break
        prose.append(text[pos:start])
        body_start = start + len(OPEN)
        call, end = _decode_in_place(text, body_start)
        if call is not None:
            calls.append(call)
            pos = end
            continue
        close = text.find(CLOSE, body_start)
        body_end = len(text) if close < 0 else close
        raw = text[body_start:body_end]
        try:
            calls.append(_parse_body(raw))
        except ValueError as exc:
            errors.append(ToolCallError(raw=raw.strip(), message=str(exc)))
        pos = len(text) if close < 0 else close + len(CLOSE)
    content = "".join(prose).replace(CLOSE, "").strip()
    return ParsedReply(content=content, tool_calls=calls, errors=errors, reasoning=reasoning)


def _decode_in_place(text: str, pos: int) -> tuple[ToolCall | None, int]:
    """Decode a JSON object at ``pos`` that is followed by the closing tag or the end of the text."""
    start = _skip_ws(text, pos)
    try:
        obj, end = JSON_DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None, pos
    after = _skip_ws(text, end)
    if text.startswith(CLOSE, after):
        after += len(CLOSE)
    elif after != len(text):
        return None, pos
    try:
        return _call_from_object(obj), after
    except ValueError:
        return None, pos


def _as_call(call: ToolCall | Mapping[str, Any]) -> ToolCall:
    if isinstance(call, ToolCall):
        return call
    if not isinstance(call, Mapping):
        raise TypeError(f"a tool call must be a ToolCall or a dict, got {type(call).__name__}")
    if "function" in call:  # the OpenAI form
        fn = call["function"]
        args = fn.get("arguments") or {}
        parsed = _call_from_object({"name": fn.get("name"), "arguments": args})
        return ToolCall(parsed.name, parsed.arguments, id=call.get("id") or new_call_id())
    return _call_from_object(dict(call))


def render_tool_calls(calls: Iterable[ToolCall | Mapping[str, Any]]) -> str:
    """The Hermes / Qwen3 text of calls: one ``<tool_call>`` block per call (OpenAI dicts accepted)."""
    blocks = []
    for call in calls:
        c = _as_call(call)
        payload = json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
        # "</" only occurs inside JSON strings; escaped, a name or argument holding "</think>" or
        # "</tool_call>" cannot end the reasoning or the block when the text is parsed back
        payload = payload.replace("</", "<\\/")
        blocks.append(f"{OPEN}\n{payload}\n{CLOSE}")
    return "\n".join(blocks)


def render_tool_response(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def render_tools_prompt(tools: Iterable[Mapping[str, Any]]) -> str:
    """The system-prompt block that announces OpenAI-style tool schemas to a Hermes / Qwen3 model."""
    lines = [json.dumps(dict(t), ensure_ascii=False) for t in tools]
    return TOOLS_PROMPT.format(tools="\n".join(lines))


def to_text_messages(messages: list[Mapping[str, Any]], tools: list[Mapping[str, Any]]) -> list[dict]:
    """Rewrite OpenAI chat messages (tool schemas, ``tool_calls``, ``tool`` turns) into plain text turns.

    This is what a model without native tool support sees: tools in the system prompt, calls as
    ``<tool_call>`` text, and consecutive tool results merged into one user turn of ``<tool_response>``.
    """
    out: list[dict] = []
    if tools:
        block = render_tools_prompt(tools)
        if messages and messages[0].get("role") == "system":
            out.append({"role": "system", "content": f"{_text(messages[0])}\n\n{block}".lstrip()})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for msg in messages:
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls"):
            text = "\n".join(p for p in (_text(msg), render_tool_calls(msg["tool_calls"])) if p)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            response = render_tool_response(_text(msg))
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_responses": True})
        else:
            out.append({"role": role, "content": msg.get("content") or ""})
    for msg in out:
        msg.pop("_tool_responses", None)
    return out


def _text(msg: Mapping[str, Any]) -> str:
    """The text of a message whose content is a string or a list of OpenAI content parts."""
    content = msg.get("content") or ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
