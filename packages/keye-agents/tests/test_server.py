"""The official ``openai`` client against ``keye-agents serve``, and keye-agents' own HTTP backend."""

import base64
import http.client
import io
import json
import threading

import pytest

from keye_agents import Agent, LocalBackend, OpenAIBackend, ScriptedBackend
from keye_agents.backends import BackendError, reply_from_stream
from keye_agents.server import make_server

openai = pytest.importorskip("openai")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
WEATHER_CALLS = (
    "Checking both cities.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
)


@pytest.fixture
def serve():
    servers = []

    def start(backend):
        server = make_server(backend, port=0, model="keye-test")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def test_openai_client_receives_well_formed_tool_calls(serve):
    backend = ScriptedBackend([WEATHER_CALLS])
    response = client(serve(backend)).chat.completions.create(
        model="keye-test", messages=[{"role": "user", "content": "Weather in Paris and Oslo?"}], tools=TOOLS
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking both cities."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_weather", {"city": "Oslo"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert backend.calls[0] == [{"role": "user", "content": "Weather in Paris and Oslo?"}]


def test_openai_client_streams_text_then_tool_calls(serve):
    stream = client(serve(ScriptedBackend([WEATHER_CALLS]))).chat.completions.create(
        model="keye-test", messages=[{"role": "user", "content": "?"}], tools=TOOLS, stream=True
    )
    text, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for tc in delta.tool_calls or []:
            calls[tc.index] = (tc.id, tc.function.name, json.loads(tc.function.arguments))
        finish = chunk.choices[0].finish_reason or finish
    assert text == "Checking both cities.\n" and finish == "tool_calls"
    assert [c[1:] for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Oslo"}),
    ]


def test_tool_results_round_trip_and_bad_requests_get_400(serve):
    backend = ScriptedBackend(["It is sunny in Paris."])
    api = client(serve(backend))
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    response = api.chat.completions.create(model="keye-test", messages=messages, tools=TOOLS)
    assert response.choices[0].message.content == "It is sunny in Paris."
    assert response.choices[0].finish_reason == "stop" and response.choices[0].message.tool_calls is None
    assert backend.calls[0][2]["tool_call_id"] == "call_1"
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        api.chat.completions.create(model="keye-test", messages=[])
    with pytest.raises(openai.BadRequestError, match="role must be"):
        api.chat.completions.create(model="keye-test", messages=[{"role": "wizard", "content": "x"}])
    assert [m.id for m in api.models.list()] == ["keye-test"]


def test_content_parts_are_text_or_data_url_images_only(serve):
    backend = ScriptedBackend(["A red square."])
    api = client(serve(backend))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    content = [image, {"type": "text", "text": "What is it?"}]
    response = api.chat.completions.create(model="keye-test", messages=[{"role": "user", "content": content}])
    assert response.choices[0].message.content == "A red square."
    assert backend.calls[0][0]["content"] == content
    for bad, reason in [
        ({"type": "image_url", "image_url": {"url": "/etc/passwd"}}, "images must be data:image"),
        (
            {"type": "image_url", "image_url": {"url": "https://example.org/a.png"}},
            "images must be data:image",
        ),
        ({"type": "image", "image": "/etc/passwd"}, "expected a text or image_url part, got 'image'"),
    ]:
        with pytest.raises(openai.BadRequestError, match=reason):
            api.chat.completions.create(model="keye-test", messages=[{"role": "user", "content": [bad]}])


def test_an_api_key_is_required_when_set():
    server = make_server(ScriptedBackend(["hello"]), port=0, api_key="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        messages = [{"role": "user", "content": "x"}]
        wrong = openai.OpenAI(base_url=server.url, api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            wrong.chat.completions.create(model="keye", messages=messages)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert (
            right.chat.completions.create(model="keye", messages=messages).choices[0].message.content
            == "hello"
        )
    finally:
        server.shutdown()
        server.server_close()


def test_backend_failure_is_a_500_with_the_reason_streamed_or_not(serve):
    api = client(serve(ScriptedBackend([])))
    with pytest.raises(openai.InternalServerError, match="only 0 replies"):
        api.chat.completions.create(model="keye-test", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.APIError, match="only 0 replies"):
        list(
            api.chat.completions.create(
                model="keye-test", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    assert [m.id for m in api.models.list()] == ["keye-test"]  # still serving


def test_one_kept_alive_connection_serves_a_failed_stream_then_a_plain_error(serve):
    server = serve(ScriptedBackend([]))
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    body = {"model": "keye", "messages": [{"role": "user", "content": "x"}]}
    connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}))
    streamed = connection.getresponse()
    assert streamed.status == 200 and b'"error"' in streamed.read()
    connection.request("POST", "/v1/chat/completions", json.dumps(body))
    plain = connection.getresponse()
    assert plain.status == 500 and json.loads(plain.read())["error"]["message"].startswith("BackendError")
    connection.close()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("native_tools", [True, False])
def test_agent_over_http_with_openai_backend(serve, tmp_path, stream, native_tools):
    """The whole loop through HTTP: Agent -> OpenAIBackend -> serve -> scripted model."""
    model = ScriptedBackend(
        [
            '<tool_call>{"name": "write_file", "arguments": {"path": "a.txt", "content": "x"}}</tool_call>',
            "Wrote it.",
        ]
    )
    server = serve(model)
    backend = OpenAIBackend(server.url, "keye-test", native_tools=native_tools)
    streamed = []
    with Agent(
        backend, ["write_file"], workspace=tmp_path, on_text=streamed.append if stream else None
    ) as agent:
        result = agent.run("write a file")
    assert result.answer == "Wrote it." and (tmp_path / "a.txt").read_text() == "x"
    if stream:
        assert "".join(streamed) == "Wrote it."
    second_request = model.calls[1]
    if native_tools:
        assert second_request[-1]["role"] == "tool" and second_request[-1]["content"].startswith(
            "wrote 1 bytes"
        )
    else:  # the tools went into the system prompt and the result came back as a <tool_response> turn
        assert "<tools>" in second_request[0]["content"]
        assert second_request[-1]["content"].startswith("<tool_response>\nwrote 1 bytes")


def test_streamed_tool_call_arguments_arrive_in_pieces():
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": "Hi"}}]},
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "call_a", "function": {"name": "f", "arguments": ""}}
                        ]
                    }
                }
            ]
        },
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"x": '}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{bad"}}
                        ]
                    }
                }
            ]
        },
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}], "usage": {"total_tokens": 9}},
    ]
    seen = []
    reply = reply_from_stream(events, seen.append)
    assert reply.content == "Hi" and seen == ["Hi"]
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == [("call_a", "f", {"x": 1})]
    assert len(reply.errors) == 1 and "tool call 'g'" in reply.errors[0].message
    assert reply.finish_reason == "tool_calls" and reply.usage == {"total_tokens": 9}


def test_garbage_from_a_server_is_a_backend_error():
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Garbage(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "8")
            self.end_headers()
            self.wfile.write(b"not json")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", timeout_s=5)
        with pytest.raises(BackendError, match="bad response from .*JSONDecodeError"):
            backend.complete([{"role": "user", "content": "x"}], [])
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_server_is_a_backend_error():
    backend = OpenAIBackend("http://127.0.0.1:9/v1", timeout_s=2)
    with pytest.raises(BackendError, match="cannot reach"):
        backend.complete([{"role": "user", "content": "x"}], [])


def _tiny_backend():
    keye_train = pytest.importorskip("keye_train")
    needed = ("KeyeVLConfig", "KeyeVLForConditionalGeneration", "KeyeProcessor")
    if not all(hasattr(keye_train, n) for n in needed):
        pytest.skip(f"keye_train does not provide {needed} yet")
    return LocalBackend.from_preset("tiny", max_new_tokens=12)


@pytest.mark.slow
def test_openai_client_against_the_tiny_local_model(serve, monkeypatch):
    monkeypatch.delenv("KEYE_PLUGINS")  # keye-train assembles the model from the other packages' plugins
    backend = _tiny_backend()
    chat, seen = backend.model.chat, []
    backend.model.chat = lambda messages, **kw: seen.append(kw["tools"]) or chat(messages, **kw)
    api = client(serve(backend))
    response = api.chat.completions.create(
        model="keye-test",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS,
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "tool_calls", "length")
    assert isinstance(choice.message.content, str | None)
    for tc in choice.message.tool_calls or []:
        assert tc.type == "function" and isinstance(json.loads(tc.function.arguments), dict)
    assert seen == [TOOLS]  # the tools reached keye-train's chat template
    image = pytest.importorskip("PIL.Image").new("RGB", (56, 56), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What colour is this?"},
    ]
    seeing = api.chat.completions.create(model="keye-test", messages=[{"role": "user", "content": content}])
    assert seeing.choices[0].message.role == "assistant" and seeing.choices[0].finish_reason is not None
    hi = [{"role": "user", "content": "hi"}]
    chunks = list(api.chat.completions.create(model="keye-test", messages=hi, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices[0].delta.content]
    whole = api.chat.completions.create(model="keye-test", messages=hi).choices[0].message.content
    assert len(deltas) > 1 and "".join(deltas).strip() == whole  # token by token; the reply is stripped
