"""The Qwen3 chat template: exact text for every turn kind, and what is marked trainable."""

import pytest

from keye_train.chat import MediaPiece, TextPiece, chat_text, render_chat


def text(messages, **kw):
    return chat_text(render_chat(messages, **kw), "<IMG>", "<VID>")


def trained(messages, **kw):
    return [p.text for p in render_chat(messages, **kw) if isinstance(p, TextPiece) and p.trainable]


def test_plain_turns():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert text(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"
    )
    assert trained(messages) == ["<think>\n\n</think>\n\nHello<|im_end|>"]


def test_generation_prompt_with_and_without_thinking():
    messages = [{"role": "user", "content": "Hi"}]
    assert text(messages, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert text(messages, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert trained(messages, add_generation_prompt=True) == []


def test_tools_tool_calls_and_tool_turns():
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
                {"name": "weather", "arguments": '{"city": "Oslo"}'},
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Sunny in Paris, rain in Oslo."},
    ]
    rendered = text(messages, tools=tools)
    assert rendered.startswith(
        "<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}\n</tools>'
    )
    assert (
        "<|im_start|>assistant\nChecking.\n<tool_call>\n"
        '{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "Sunny in Paris, rain in Oslo.<|im_end|>\n"
    ) in rendered
    # both assistant turns are trained; tool results and the system prompt are not
    assert len(trained(messages, tools=tools)) == 2
    assert not any("tool_response" in t for t in trained(messages, tools=tools))


def test_reasoning_kept_only_after_the_last_query():
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nold\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "new"},
    ]
    rendered = text(messages)
    assert "old" not in rendered
    assert "<|im_start|>assistant\nA1<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n<think>\nnew\n</think>\n\nA2<|im_end|>\n")


def test_media_parts_become_pieces_in_order():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": "then"},
                {"type": "video", "video": "b.mp4", "fps": 1.0},
            ],
        }
    ]
    pieces = render_chat(messages)
    media = [p for p in pieces if isinstance(p, MediaPiece)]
    assert [m.kind for m in media] == ["image", "video"] and media[1].part["fps"] == 1.0
    assert text(messages) == "<|im_start|>user\n<IMG>then<VID><|im_end|>\n"
    openai = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,x"}}]}
    ]
    (piece,) = [p for p in render_chat(openai) if isinstance(p, MediaPiece)]
    assert piece.kind == "image" and piece.part["image"] == "data:image/png;base64,x"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "messages is empty"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\] must be a dict with a role"),
        ([{"role": "assistant", "content": [{"type": "image", "image": "a"}]}], r"may hold only text"),
        ([{"role": "user", "content": [{"type": "audio"}]}], r"content\[0\] must be a dict with type"),
        ([{"role": "user", "content": [{"type": "image"}]}], r"without a 'image' value"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"without a 'image' value"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}], "needs a 'name'"),
    ],
)
def test_bad_messages_are_named(messages, match):
    with pytest.raises((ValueError, TypeError), match=match):
        render_chat(messages)
