import pytest

from keye_agents import LocalBackend, ScriptedBackend
from keye_agents.backends import BackendError, VisibleText, reply_from_message


class RecordingModel:
    """Stands in for KeyeVLForConditionalGeneration.chat: records what the backend passes."""

    def __init__(self, reply):
        self.reply, self.seen = reply, []

    def chat(self, messages, **kwargs):
        self.seen.append((messages, kwargs))
        return self.reply


def test_local_backend_passes_messages_tools_and_options_and_parses_calls():
    model = RecordingModel(
        '<think>need data</think>Looking.\n<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    )
    backend = LocalBackend(model, "PROCESSOR", max_new_tokens=7, enable_thinking=False)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    streamed = []
    reply = backend.complete([{"role": "user", "content": "hi"}], tools, on_text=streamed.append)
    messages, kwargs = model.seen[0]
    assert messages == [{"role": "user", "content": "hi"}]
    assert kwargs == {"tools": tools, "processor": "PROCESSOR", "max_new_tokens": 7, "enable_thinking": False}
    assert (reply.content, reply.reasoning, reply.finish_reason) == ("Looking.", "need data", "tool_calls")
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("f", {"a": 1})]
    assert "".join(streamed) == "<think>need data</think>Looking.\n"
    assert backend.complete([{"role": "user", "content": "x"}], [])
    assert model.seen[1][1]["tools"] is None


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
