import pytest

from keye_agents import LocalBackend, ScriptedBackend
from keye_agents.backends import BackendError, Reply, VisibleText, reply_from_message


class RecordingModel:
    """Stands in for KeyeVLForConditionalGeneration.chat: records what the backend passes."""

    def __init__(self, reply):
        self.reply, self.seen = reply, []

    def chat(self, messages, stream=None, **kwargs):
        self.seen.append((messages, kwargs))
        self.generating = True
        for start in range(0, len(self.reply), 5):  # deltas while "generating", as keye-train sends them
            if stream is not None:
                stream(self.reply[start : start + 5])
        self.generating = False
        return self.reply


def test_local_backend_passes_messages_tools_and_options_and_parses_calls():
    model = RecordingModel(
        '<think>need data</think>Looking.\n<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    )
    backend = LocalBackend(model, "PROCESSOR", max_new_tokens=7, enable_thinking=False)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    streamed = []
    reply = backend.complete(
        [{"role": "user", "content": "hi"}], tools, on_text=lambda t: streamed.append((t, model.generating))
    )
    messages, kwargs = model.seen[0]
    assert messages == [{"role": "user", "content": "hi"}]
    assert kwargs == {"tools": tools, "processor": "PROCESSOR", "max_new_tokens": 7, "enable_thinking": False}
    assert (reply.content, reply.reasoning, reply.finish_reason) == ("Looking.", "need data", "tool_calls")
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("f", {"a": 1})]
    assert "".join(t for t, _ in streamed) == "<think>need data</think>Looking.\n"
    assert len(streamed) > 1 and all(during for _, during in streamed)  # real deltas, not a replay
    assert backend.complete([{"role": "user", "content": "x"}], [])
    assert model.seen[1][1]["tools"] is None


@pytest.mark.slow
def test_local_backend_streams_the_tiny_models_tokens(monkeypatch):
    keye_train = pytest.importorskip("keye_train")
    if not hasattr(keye_train, "KeyeVLForConditionalGeneration"):
        pytest.skip("keye_train does not provide KeyeVLForConditionalGeneration yet")
    monkeypatch.delenv("KEYE_PLUGINS")  # keye-train assembles the model from the other packages' plugins
    backend = LocalBackend.from_preset("tiny", max_new_tokens=12, eos_token_id=[])
    messages = [{"role": "user", "content": "hi"}]
    whole, visible = backend.model.chat(messages, **backend.generate), []
    VisibleText.replay(whole, visible.append)

    decoded, streamed, generate = [], [], backend.model.generate

    def counting_generate(*args, streamer, **kwargs):  # counts tokens as the decoder emits them
        return generate(*args, streamer=lambda t: decoded.append(t) or streamer(t), **kwargs)

    monkeypatch.setattr(backend.model, "generate", counting_generate)
    reply = backend.complete(messages, [], on_text=lambda t: streamed.append((t, len(decoded))))
    assert len(decoded) == 12 and len(streamed) > 1 and streamed[0][1] < 12  # text came mid-generation
    assert "".join(t for t, _ in streamed) == "".join(visible)
    assert reply == Reply.from_text(whole)


def test_local_backend_turns_openai_image_parts_into_keye_image_parts():
    model = RecordingModel("A red square.")
    url = "data:image/png;base64,iVBORw0KGgo="
    message = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
    }
    LocalBackend(model).complete([{"role": "system", "content": "Be brief."}, message], [])
    sent = model.seen[0][0]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert sent[1]["content"] == [{"type": "image", "image": url}, {"type": "text", "text": "?"}]
    assert message["content"][0]["type"] == "image_url"  # the caller's messages are not modified


def test_local_backend_refuses_a_model_without_chat():
    with pytest.raises(TypeError, match="needs a model with a chat"):
        LocalBackend(object())


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11, 100])
def test_visible_text_hides_calls_split_anywhere(size):
    text = "Answer <b>soon</b> <tool_call>{secret}</tool_call> never shown"
    seen = []
    visible = VisibleText(seen.append)
    for start in range(0, len(text), size):
        visible.feed(text[start : start + size])
    visible.close()
    assert "".join(seen) == "Answer <b>soon</b> "


def test_visible_text_releases_a_held_partial_tag_at_the_end():
    seen = []
    visible = VisibleText(seen.append)
    visible.feed("a <tool_ca")
    visible.close()
    assert "".join(seen) == "a <tool_ca"


def test_scripted_backend_from_file_validates(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="expected a JSON list of reply strings"):
        ScriptedBackend.from_file(str(bad))
    with pytest.raises(BackendError, match="only 0 replies"):
        ScriptedBackend([]).complete([], [])


def test_text_tool_calls_from_a_server_without_a_tool_parser():
    payload = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": 'Sure.<tool_call>{"name": "f", "arguments": {}}</tool_call>',
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3},
    }
    reply = reply_from_message(payload)
    assert (reply.content, reply.finish_reason, reply.usage) == ("Sure.", "tool_calls", {"prompt_tokens": 3})
    assert [c.name for c in reply.tool_calls] == ["f"]
    with pytest.raises(BackendError, match="malformed chat completion"):
        reply_from_message({"choices": []})
