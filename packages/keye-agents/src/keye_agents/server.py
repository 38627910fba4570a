"""``keye-agents serve``: any backend behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

Why the standard library: the endpoint is a thin adapter (requests in, ``Reply`` out, JSON or SSE
back), so http.server is enough and keeps keye-agents' dependencies to pluggy, jsonschema and bm25s.
Calls go through one lock because a local model is not safe to run from several threads at once.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from keye_agents.backends import Backend, Reply
from keye_agents.toolcalls import CLOSE, OPEN


class RequestError(ValueError):
    """A client request that does not follow the chat-completions format."""


def _check_parts(content: Any, n: int) -> None:
    """Text and ``data:`` image URLs only: a client must never make the server read its own files or
    fetch a URL on the client's behalf."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise RequestError(f"messages[{n}].content must be a string or a list of content parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if isinstance(url, str) and url.startswith("data:image/"):
                continue
            raise RequestError(f"messages[{n}].content[{j}]: images must be data:image/...;base64 URLs")
        raise RequestError(f"messages[{n}].content[{j}]: expected a text or image_url part, got {kind!r}")


def _check_request(body: Any) -> tuple[list[dict], list[dict], bool]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError("'messages' must be a non-empty list of message objects")
    for n, m in enumerate(messages):
        if m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(
                f"messages[{n}].role must be system, user, assistant or tool, got {m.get('role')!r}"
            )
        _check_parts(m.get("content"), n)
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "function" in t for t in tools):
        raise RequestError("'tools' must be a list of {'type': 'function', 'function': {...}} objects")
    if body.get("tool_choice") == "none":
        tools = []
    messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    return messages, tools, bool(body.get("stream"))


def _content(reply: Reply) -> str:
    """Prose plus any call the model botched, kept verbatim so the client still sees it."""
    broken = "".join(f"\n{OPEN}{e.raw}{CLOSE}" for e in reply.errors)
    return (reply.content + broken).strip()


def completion(reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": _content(reply) or None}
    if reply.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in reply.tool_calls]
    body = {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
    }
    if reply.usage:
        body["usage"] = reply.usage
    return body


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: Backend, model: str, api_key: str | None = None):
        super().__init__(address, _Handler)
        self.backend, self.model, self.lock = backend, model, threading.Lock()
        self.api_key = api_key

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet by default; errors still answer JSON
        pass

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def _authorized(self) -> bool:
        """With an API key set, every request must carry ``Authorization: Bearer <key>``."""
        key = self.server.api_key
        if key is None or hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {key}"):
            return True
        self._error(401, "missing or wrong API key", "invalid_api_key")
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._json(
                200,
                {
                    "object": "list",
                    "data": [{"id": self.server.model, "object": "model", "owned_by": "keye"}],
                },
            )
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        self._streaming = False  # one handler serves every request of a kept-alive connection
        try:  # read the body first: an unread body would corrupt the next request on this connection
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        except ValueError:
            self._error(400, "bad Content-Length", "invalid_request_error")
            return
        if not self._authorized():
            return
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route {self.path}", "not_found")
            return
        try:
            messages, tools, stream = _check_request(json.loads(raw or b"null"))
        except (ValueError, RequestError) as exc:
            self._error(400, str(exc), "invalid_request_error")
            return
        try:
            if stream:
                self._stream(messages, tools)
            else:
                with self.server.lock:
                    reply = self.server.backend.complete(messages, tools)
                self._json(200, completion(reply, self.server.model))
        except Exception as exc:  # the client gets the reason; the server keeps serving
            error = {"message": f"{type(exc).__name__}: {exc}", "type": "server_error", "code": 500}
            if not self._streaming:
                self._json(500, {"error": error})
            else:  # headers are gone: end the stream with an error event, as OpenAI's servers do
                with contextlib.suppress(OSError):  # unless the client is what went away
                    self._chunk(f"data: {json.dumps({'error': error})}\n\n".encode())
                    self._chunk(b"")

    def _stream(self, messages: list[dict], tools: list[dict]) -> None:
        cid, created, model = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), self.server.model

        def send(delta: dict[str, Any], finish: str | None = None) -> None:
            chunk = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())

        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        send({"role": "assistant", "content": ""})
        with self.server.lock:
            reply = self.server.backend.complete(
                messages, tools, on_text=lambda text: send({"content": text})
            )
        if reply.errors:  # botched calls were hidden from the text stream; show them verbatim
            send({"content": "".join(f"\n{OPEN}{e.raw}{CLOSE}" for e in reply.errors)})
        for n, call in enumerate(reply.tool_calls):
            send({"tool_calls": [{"index": n, **call.to_openai()}]})
        send({}, reply.finish_reason)
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def make_server(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str = "keye",
    api_key: str | None = None,
) -> ChatServer:
    """A server bound to ``host:port`` (port 0 picks a free one); call ``serve_forever`` to run it.
    ``api_key`` makes every request prove it knows the key."""
    return ChatServer((host, port), backend, model, api_key)
