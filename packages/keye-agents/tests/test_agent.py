"""Scripted-model runs: code, tool and search scenarios, recovery from failures, budgets, transcript."""

import json
import time

import pytest

from keye_agents import Agent, ScriptedBackend, ToolError, parse_tool_calls, tool
from keye_agents.sandbox import SandboxLimits


def call(name, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def last_tool_result(messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "tool")


FAST = {"limits": SandboxLimits(cpu_s=5, memory_mb=512), "timeout_s": 20}


def test_code_scenario_with_state_across_turns(tmp_path):
    backend = ScriptedBackend(
        [
            "I'll compute it.\n" + call("python", code="total = sum(i * i for i in range(10))\ntotal"),
            lambda msgs: f"The sum of squares is {last_tool_result(msgs).split('stdout:')[1].strip()}.",
            call("python", code="total * 2"),
            lambda msgs: f"Doubled: {last_tool_result(msgs).split('stdout:')[1].strip()}",
        ]
    )
    with Agent(backend, ["python"], workspace=tmp_path, tool_options=FAST) as agent:
        first = agent.run("Sum the squares below 10.")
        second = agent.run("Now double it.")  # the sandbox session and the conversation carry over
    assert (first.stop_reason, first.answer, first.steps) == ("answer", "The sum of squares is 285.", 2)
    assert second.answer == "Doubled: 570"
    assert agent.state.turns == 2 and agent.state.steps == 4 and agent.state.calls_by_tool == {"python": 2}
    turn = ["user", "assistant", "tool", "assistant"]
    assert [m["role"] for m in agent.messages] == ["system", *turn, *turn]
    assert backend.calls[2][-1] == {"role": "user", "content": "Now double it."}


def test_tool_error_is_fed_back_and_the_model_recovers(tmp_path):
    @tool
    def divide(a: float, b: float) -> float:
        """Divide a by b."""
        if b == 0:
            raise ToolError("cannot divide by zero; pick another divisor")
        return a / b

    @tool
    def flaky(x: int) -> str:
        """A tool with a bug."""
        return {}["missing"]

    backend = ScriptedBackend(
        [
            call("divide", a=1, b=0),
            call("divide", a="one", b=2),
            call("flaky", x=1) + call("no_such_tool"),
            call("divide", a=1, b=4),
            "1/4 = 0.25",
        ]
    )
    transcript = tmp_path / "run.jsonl"
    with Agent(backend, [divide, flaky], workspace=tmp_path, transcript=transcript) as agent:
        result = agent.run("divide")
    assert result.answer == "1/4 = 0.25" and result.stop_reason == "answer"
    results = [m["content"] for m in agent.messages if m["role"] == "tool"]
    assert results[0].startswith("Error: cannot divide by zero") and "Fix the call" in results[0]
    assert results[1].startswith(
        "Error: invalid arguments for tool 'divide': a: 'one' is not of type 'number'"
    )
    assert (
        results[2]
        == "Error: flaky raised KeyError: 'missing'\nFix the call (or try another approach) and continue."
    )
    assert results[3].startswith("Error: there is no tool named 'no_such_tool'; the tools are divide, flaky")
    assert results[4] == "0.25"
    assert agent.state.tool_errors == 4
    events = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [e["event"] for e in events].count("tool") == 5
    assert events[0] == {**events[0], "event": "start", "tools": ["divide", "flaky"], "max_steps": 10}
    assert events[1]["event"] == "task" and events[-1] == {**events[-1], "event": "stop", "reason": "answer"}
    assert [e["ok"] for e in events if e["event"] == "tool"] == [False, False, False, False, True]


def test_unparseable_call_is_explained_and_retried(tmp_path):
    backend = ScriptedBackend(
        ['<tool_call>{"name": "list_files", "arguments": {path: "."}}</tool_call>', "fine"]
    )
    with Agent(backend, ["list_files"], workspace=tmp_path) as agent:
        result = agent.run("list")
    assert result.answer == "fine" and result.steps == 2
    feedback = backend.calls[1][-1]
    assert feedback["role"] == "user" and "could not be understood" in feedback["content"]
    assert "not valid JSON" in feedback["content"]
    assert any(e["event"] == "parse_error" for e in agent.transcript)


def test_search_and_file_scenario_with_citation(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "handbook.md").write_text("Refunds are accepted within 30 days of purchase.\nKeep the receipt.\n")
    backend = ScriptedBackend(
        [
            call("search", query="refund days"),
            lambda msgs: (
                call("write_file", path="answer.md", content=last_tool_result(msgs).splitlines()[1])
                + "\n"
                + call("list_files")
            ),
            "Refunds: 30 days [1] (handbook.md:1-2).",
        ]
    )
    with Agent(
        backend,
        ["search", "write_file", "list_files"],
        workspace=tmp_path / "ws",
        tool_options={"docs": docs},
    ) as a:
        result = a.run("What is the refund window?")
    assert result.answer == "Refunds: 30 days [1] (handbook.md:1-2)."
    assert (tmp_path / "ws" / "answer.md").read_text() == "Refunds are accepted within 30 days of purchase."
    tool_messages = [m for m in a.messages if m["role"] == "tool"]
    assert tool_messages[0]["content"].startswith("[1] handbook.md:1-2")
    assert tool_messages[2]["content"] == "answer.md"
    assert [c["function"]["name"] for c in a.messages[4]["tool_calls"]] == ["write_file", "list_files"]


def test_step_budget_stops_a_model_that_never_answers(tmp_path):
    backend = ScriptedBackend([call("list_files")] * 5)
    with Agent(backend, ["list_files"], workspace=tmp_path, max_steps=3) as agent:
        result = agent.run("loop")
    assert (result.stop_reason, result.steps, result.answer) == ("step_budget", 3, "")


def test_time_budget_stops_the_run_and_caps_tool_time(tmp_path):
    backend = ScriptedBackend([call("python", code="import time\ntime.sleep(30)"), "never reached"])
    started = time.monotonic()
    with Agent(backend, ["python"], workspace=tmp_path, time_budget_s=1.5, tool_options=FAST) as agent:
        result = agent.run("sleep")
    assert result.stop_reason == "time_budget" and result.steps == 1
    assert "wall-time limit" in last_tool_result(agent.messages)
    assert time.monotonic() - started < 10


def test_streaming_text_hides_tool_call_markup(tmp_path):
    streamed: list[str] = []
    reply = "Let me check the folder now, please wait.\n" + call("list_files")
    backend = ScriptedBackend([reply, "Empty folder."])
    with Agent(backend, ["list_files"], workspace=tmp_path, on_text=streamed.append) as agent:
        agent.run("look")
    text = "".join(streamed)
    assert text == "Let me check the folder now, please wait.\nEmpty folder."
    assert len(streamed) > 5


def test_backend_error_ends_the_run_cleanly(tmp_path):
    with Agent(ScriptedBackend([]), ["list_files"], workspace=tmp_path) as agent:
        result = agent.run("x")
    assert result.stop_reason == "backend_error"
    assert "only 0 replies" in agent.transcript[-2]["error"]


def test_unknown_tool_names_are_refused_up_front(tmp_path):
    with pytest.raises(KeyError, match="no tool named 'teleport'; available: .*python"):
        Agent(ScriptedBackend([]), ["teleport"], workspace=tmp_path)


def test_messages_are_valid_openai_chat_form(tmp_path):
    backend = ScriptedBackend([call("list_files"), "done"])
    with Agent(backend, ["list_files"], workspace=tmp_path) as agent:
        agent.run("x")
    assistant, tool_msg = agent.messages[2], agent.messages[3]
    tc = assistant["tool_calls"][0]
    assert tc["type"] == "function" and json.loads(tc["function"]["arguments"]) == {}
    assert tool_msg["tool_call_id"] == tc["id"] and tool_msg["name"] == "list_files"
    assert parse_tool_calls(backend.replies[0]).tool_calls[0].name == "list_files"


def test_long_tool_results_are_cut_for_the_model(tmp_path):
    @tool
    def dump() -> str:
        """Return a lot of text."""
        return "x" * 5000

    with Agent(
        ScriptedBackend([call("dump"), "ok"]), [dump], workspace=tmp_path, max_result_chars=100
    ) as agent:
        agent.run("dump")
    result = last_tool_result(agent.messages)
    assert result == "x" * 100 + "\n[... 4900 more characters cut; ask for less]"
