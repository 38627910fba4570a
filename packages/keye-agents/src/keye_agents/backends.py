"""Model backends: anything with ``complete(messages, tools, *, on_text=None) -> Reply``.

Built in: any OpenAI-compatible HTTP server (native ``tool_calls``, or Hermes text for servers without
tool support; SSE streaming), the local Keye model through keye-train (optional extra ``local``), and a
scripted backend that replays fixed replies (tests, demos, reproducing a transcript).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from keye_agents.toolcalls import (
    JSON_DECODER,
    OPEN,
    ToolCall,
    ToolCallError,
    new_call_id,
    parse_tool_calls,
    to_text_messages,
)

OnText = Callable[[str], None]


class BackendError(RuntimeError):
    """The model server could not be reached or answered with an error."""


@dataclass
class Reply:
    """One assistant turn: prose, well-formed tool calls, and calls that could not be understood."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    finish_reason: str = "stop"
    reasoning: str = ""
    usage: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_text(cls, text: str, finish_reason: str = "stop") -> Reply:
        """Parse Hermes tool calls out of model text; a turn with calls finishes with ``tool_calls``."""
        parsed = parse_tool_calls(text)
        finish = "tool_calls" if parsed.tool_calls else finish_reason
        return cls(parsed.content, parsed.tool_calls, parsed.errors, finish, parsed.reasoning)


class Backend(Protocol):
    def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, on_text: OnText | None = None
    ) -> Reply: ...


class VisibleText:
    """Streams model text to a callback, hiding ``<tool_call>`` blocks (even when a tag is split
    across chunks): what a user watching the stream should see."""

    def __init__(self, on_text: OnText):
        self.on_text, self.held, self.hidden = on_text, "", False

    def feed(self, chunk: str) -> None:
        if self.hidden:
            return
        text = self.held + chunk
        cut = text.find(OPEN)
        if cut >= 0:
            self.hidden = True
            self._emit(text[:cut])
            return
        keep = next((n for n in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-n:])), 0)
        self.held = text[len(text) - keep :] if keep else ""
        self._emit(text[: len(text) - keep])

    def close(self) -> None:
        if not self.hidden:
            self._emit(self.held)
        self.held = ""

    @classmethod
    def replay(cls, text: str, on_text: OnText, chunk: int | None = None) -> None:
        """Send finished text through the filter, whole or ``chunk`` characters at a time."""
        visible = cls(on_text)
        step = chunk or max(len(text), 1)
        for start in range(0, len(text), step):
            visible.feed(text[start : start + step])
        visible.close()

    def _emit(self, text: str) -> None:
        if text:
            self.on_text(text)


class OpenAIBackend:
    """Any server speaking OpenAI's ``/chat/completions`` (vLLM, SGLang, llama.cpp, keye-agents serve).

    ``native_tools=False`` sends tools in the Hermes system prompt and parses calls from the text, for
    servers that do not parse tool calls themselves; with native tools, calls found in the text are
    still honoured when the server returned none.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "default",
        api_key: str | None = None,
        *,
        native_tools: bool = True,
        timeout_s: float = 300.0,
        params: Mapping[str, Any] | None = None,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.native_tools, self.timeout_s = native_tools, timeout_s
        self.params = dict(params or {})

    def complete(self, messages, tools, *, on_text: OnText | None = None) -> Reply:
        body: dict[str, Any] = {"model": self.model, **self.params, "stream": on_text is not None}
        if self.native_tools:
            body["messages"] = list(messages)
            if tools:
                body["tools"] = list(tools)
        else:
            body["messages"] = to_text_messages(list(messages), list(tools))
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")[:2000]
            raise BackendError(f"{self.url} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BackendError(f"cannot reach {self.url}: {exc}") from None
        try:
            with response:
                if on_text is None:
                    return reply_from_message(json.load(response))
                return reply_from_stream(_sse_events(response), on_text)
        except (ValueError, OSError) as exc:  # invalid JSON, a broken stream, a read timeout
            raise BackendError(f"bad response from {self.url}: {type(exc).__name__}: {exc}") from None


def _sse_events(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    for raw in lines:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _native_calls(raw_calls: Iterable[Mapping[str, Any]]) -> tuple[list[ToolCall], list[ToolCallError]]:
    calls, errors = [], []
    for raw in raw_calls:
        fn = raw.get("function") or {}
        name, args = fn.get("name") or "", fn.get("arguments") or "{}"
        try:
            parsed = JSON_DECODER.decode(args) if isinstance(args, str) else args
            if not isinstance(parsed, dict):
                raise ValueError(f"arguments must be a JSON object, got {type(parsed).__name__}")
            if not name:
                raise ValueError("the call has no function name")
            calls.append(ToolCall(name, parsed, id=raw.get("id") or new_call_id()))
        except (ValueError, RecursionError) as exc:
            errors.append(ToolCallError(raw=f"{name}({args})", message=f"tool call {name!r}: {exc}"))
    return calls, errors


def _merge(reply: Reply, native: list[Mapping[str, Any]], usage: Mapping[str, Any] | None) -> Reply:
    """Prefer the server's native calls; keep calls found in the text when there are none."""
    if native:
        reply.tool_calls, errors = _native_calls(native)
        reply.errors += errors
    if reply.tool_calls:
        reply.finish_reason = "tool_calls"
    reply.usage = dict(usage or {})
    return reply


def reply_from_message(payload: Mapping[str, Any]) -> Reply:
    """A non-streamed ``chat.completion`` response."""
    try:
        choice = payload["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise BackendError(f"malformed chat completion: {json.dumps(payload)[:500]}") from None
    reply = Reply.from_text(message.get("content") or "", finish_reason=choice.get("finish_reason") or "stop")
    return _merge(reply, message.get("tool_calls") or [], payload.get("usage"))


def reply_from_stream(events: Iterable[Mapping[str, Any]], on_text: OnText) -> Reply:
    """Assemble ``chat.completion.chunk`` events: text deltas go to ``on_text`` as they come, tool-call
    deltas are joined by index (id and name once, arguments as string pieces)."""
    text: list[str] = []
    visible = VisibleText(on_text)
    pieces: dict[int, dict[str, Any]] = {}
    finish, usage = "stop", None
    for event in events:
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                text.append(delta["content"])
                visible.feed(delta["content"])
            for tc in delta.get("tool_calls") or []:
                slot = pieces.setdefault(
                    tc.get("index", len(pieces)), {"id": None, "name": "", "arguments": ""}
                )
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    visible.close()
    native = [
        {"id": p["id"], "function": {"name": p["name"], "arguments": p["arguments"]}}
        for _, p in sorted(pieces.items())
    ]
    return _merge(Reply.from_text("".join(text), finish_reason=finish), native, usage)


class ScriptedBackend:
    """Replays fixed assistant texts in order (Hermes ``<tool_call>`` text included), one per turn.

    Each entry is a string, or a callable taking the messages so far and returning a string (for
    replies that depend on tool results). Running out of replies is an error, never a silent stop.
    """

    def __init__(self, replies: Iterable[str | Callable[[list[dict[str, Any]]], str]]):
        self.replies = list(replies)
        self.calls: list[list[dict[str, Any]]] = []

    @classmethod
    def from_file(cls, path: str) -> ScriptedBackend:
        """A JSON list of reply strings."""
        with open(path, encoding="utf-8") as f:
            replies = json.load(f)
        if not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
            raise ValueError(f"{path}: expected a JSON list of reply strings")
        return cls(replies)

    def complete(self, messages, tools, *, on_text: OnText | None = None) -> Reply:
        turn = len(self.calls)
        if turn >= len(self.replies):
            raise BackendError(
                f"scripted backend has only {len(self.replies)} replies; turn {turn + 1} asked"
            )
        self.calls.append([dict(m) for m in messages])
        entry = self.replies[turn]
        text = entry(list(messages)) if callable(entry) else entry
        if on_text is not None:
            VisibleText.replay(text, on_text, chunk=7)  # a few characters at a time, like a real stream
        return Reply.from_text(text)


def keye_parts(message: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI ``image_url`` content parts as keye-train image parts (a ``data:`` URL, ``file://`` or path;
    keye-vision decodes them). Other messages pass unchanged."""
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    parts = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            parts.append({"type": "image", "image": url})
        else:
            parts.append(part)
    return {**message, "content": parts}


class LocalBackend:
    """The Keye model in this process, through keye-train (``pip install 'keye-agents[local]'``).

    keye-train's Qwen3 chat template puts the tools in the system prompt and renders earlier calls and
    results in Hermes form; calls are parsed from the generated text, exactly as the model was trained.
    With ``on_text``, text streams token by token as it is generated (``model.chat(..., stream=...)``).
    Extra keyword options (``enable_thinking``, ``temperature``, ...) go to ``model.chat``. Pass a built
    ``model`` (and ``processor``), or use ``from_pretrained`` or ``from_preset``.
    """

    def __init__(self, model: Any, processor: Any = None, *, max_new_tokens: int = 512, **generate: Any):
        if not callable(getattr(model, "chat", None)):
            raise TypeError(
                f"LocalBackend needs a model with a chat(messages, ...) helper, got {type(model).__name__}"
            )
        self.model, self.processor = model, processor
        self.generate = {"max_new_tokens": max_new_tokens, **generate}

    @staticmethod
    def _keye_train():
        try:
            import keye_train
        except ImportError as exc:
            raise BackendError(
                "the local backend needs keye-train: pip install 'keye-agents[local]'"
            ) from exc
        missing = [
            n
            for n in ("KeyeVLConfig", "KeyeVLForConditionalGeneration", "KeyeProcessor")
            if not hasattr(keye_train, n)
        ]
        if missing:
            raise BackendError(f"the installed keye-train lacks {', '.join(missing)} (DESIGN §8)")
        return keye_train

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", **kwargs: Any) -> LocalBackend:
        kt = cls._keye_train()
        model = kt.KeyeVLForConditionalGeneration.from_pretrained(path, device=device)
        return cls(model.eval(), kt.KeyeProcessor.from_pretrained(path), **kwargs)

    @classmethod
    def from_preset(cls, preset: str = "tiny", *, seed: int = 0, **kwargs: Any) -> LocalBackend:
        """A freshly initialised model of a preset: for smoke tests and serving demos, not for answers."""
        import torch

        kt = cls._keye_train()
        torch.manual_seed(seed)
        model = kt.KeyeVLForConditionalGeneration(kt.KeyeVLConfig.preset(preset))
        return cls(model.eval(), kt.KeyeProcessor(), **kwargs)

    def complete(self, messages, tools, *, on_text: OnText | None = None) -> Reply:
        kwargs = dict(self.generate)
        if self.processor is not None:
            kwargs["processor"] = self.processor
        visible = VisibleText(on_text) if on_text is not None else None
        if visible is not None:
            kwargs["stream"] = visible.feed  # text deltas as keye-train generates the tokens
        text = self.model.chat([keye_parts(m) for m in messages], tools=list(tools) or None, **kwargs)
        if visible is not None:
            visible.close()
        return Reply.from_text(text)
