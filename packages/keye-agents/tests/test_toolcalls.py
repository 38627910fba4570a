import json

from hypothesis import given, settings
from hypothesis import strategies as st

from keye_agents import ToolCall, parse_tool_calls, render_tool_calls
from keye_agents.toolcalls import to_text_messages


def call_block(payload) -> str:
    return f"<tool_call>\n{json.dumps(payload)}\n</tool_call>"


def test_several_calls_with_prose_between():
    text = (
        "I will look twice.\n"
        + call_block({"name": "search", "arguments": {"query": "bm25"}})
        + "\nand then\n"
        + call_block({"name": "python", "arguments": {"code": "print(1)"}})
    )
    parsed = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("search", {"query": "bm25"}),
        ("python", {"code": "print(1)"}),
    ]
    assert parsed.content == "I will look twice.\n\nand then"
    assert parsed.errors == []


def test_unclosed_final_tag_is_still_a_call():
    parsed = parse_tool_calls('ok <tool_call>{"name": "f", "arguments": {"x": 1}}')
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", {"x": 1})]
    assert parsed.content == "ok"


def test_invalid_json_is_an_error_not_an_exception_and_other_calls_survive():
    text = "<tool_call>{name: f}</tool_call>" + call_block({"name": "g", "arguments": {}})
    parsed = parse_tool_calls(text)
    assert [c.name for c in parsed.tool_calls] == ["g"]
    assert len(parsed.errors) == 1
    assert "not valid JSON" in parsed.errors[0].message
    assert parsed.errors[0].raw == "{name: f}"


def test_truncated_json_in_unclosed_tag_is_an_error():
    parsed = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": ')
    assert parsed.tool_calls == [] and len(parsed.errors) == 1


def test_missing_name_and_non_object_arguments_are_errors():
    parsed = parse_tool_calls(call_block({"arguments": {}}) + call_block({"name": "f", "arguments": [1]}))
    assert parsed.tool_calls == []
    assert "name" in parsed.errors[0].message
    assert "must be a JSON object" in parsed.errors[1].message


def test_lenient_forms_models_emit():
    fenced = '<tool_call>\n```json\n{"name": "f", "arguments": {"a": 1}}\n```\n</tool_call>'
    string_args = call_block({"name": "g", "arguments": json.dumps({"b": 2})})
    raw_newline = '<tool_call>{"name": "python", "arguments": {"code": "x = 1\nprint(x)"}}</tool_call>'
    parsed = parse_tool_calls(fenced + string_args + raw_newline)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("f", {"a": 1}),
        ("g", {"b": 2}),
        ("python", {"code": "x = 1\nprint(x)"}),
    ]


def test_closing_tag_inside_an_argument_string():
    args = {"code": "s = '</tool_call>'\nprint(s)"}
    parsed = parse_tool_calls(call_block({"name": "python", "arguments": args}) + " done")
    assert parsed.tool_calls[0].arguments == args
    assert parsed.content == "done"


def test_calls_inside_reasoning_are_not_run():
    text = "<think>maybe " + call_block({"name": "rm", "arguments": {}}) + "</think>Answer: 4"
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == [] and parsed.content == "Answer: 4"
    assert "maybe" in parsed.reasoning


def test_stray_closing_tag_is_dropped_from_content():
    assert parse_tool_calls("hello </tool_call> world").content == "hello  world"


def test_render_accepts_openai_form():
    openai_call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 2}'}}
    assert (
        render_tool_calls([openai_call]) == '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>'
    )


def test_to_text_messages_renders_tools_calls_and_merged_responses():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [ToolCall("f", {"i": 1}).to_openai()]},
        {"role": "tool", "tool_call_id": "a", "content": "one"},
        {"role": "tool", "tool_call_id": "b", "content": "two"},
    ]
    out = to_text_messages(messages, tools)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '<tools>\n{"type": "function"' in out[0]["content"]
    assert parse_tool_calls(out[2]["content"]).tool_calls == [ToolCall("f", {"i": 1})]
    assert out[3] == {
        "role": "user",
        "content": "<tool_response>\none\n</tool_response>\n<tool_response>\ntwo\n</tool_response>",
    }
    assert len(out) == 4


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
calls = st.builds(
    ToolCall,
    name=st.text(min_size=1).filter(lambda s: s.strip() == s and s),
    arguments=st.dictionaries(st.text(), json_values, max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(calls, max_size=4), st.text().map(lambda s: s.replace("<", "").strip()))
def test_render_then_parse_round_trips(call_list, prose):
    text = (prose + "\n" if prose else "") + render_tool_calls(call_list)
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == call_list
    assert parsed.errors == []
    assert parsed.content == prose


TAGS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "```json", "```"]
JSON_BITS = [
    "{",
    "}",
    "[",
    "]",
    '"',
    '"name"',
    '"arguments"',
    ":",
    ",",
    "\\",
    "\n",
    " ",
    "null",
    "1e999",
    "9" * 5000,
]
fragments = st.sampled_from(TAGS + JSON_BITS)
model_text = st.lists(st.one_of(fragments, st.text(max_size=8)), max_size=40).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), model_text))
def test_parser_never_raises_on_arbitrary_text(text):
    parsed = parse_tool_calls(text)
    assert isinstance(parsed.content, str)
    for call in parsed.tool_calls:
        assert isinstance(call.name, str) and call.name and isinstance(call.arguments, dict)
    for error in parsed.errors:
        assert isinstance(error.message, str) and error.message


def test_deep_nesting_does_not_raise():
    parsed = parse_tool_calls("<tool_call>" + "[" * 100_000 + "</tool_call>")
    assert parsed.tool_calls == [] and len(parsed.errors) == 1
