"""The agent loop: model turn, tool calls, results back to the model, until an answer or a budget ends.

Why it is shaped this way: a model's mistakes (unparseable calls, unknown tools, bad arguments, tools
that raise) are fed back as messages so it can correct itself, never raised; every step is written to a
JSONL transcript as it happens (a crash keeps the record); and the conversation, tool sessions and
counters persist across ``run`` calls, so a follow-up task builds on the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye_agents.backends import Backend, BackendError, OnText, Reply
from keye_agents.plugins import Plugins, load_plugins
from keye_agents.toolcalls import ToolCall
from keye_agents.tools import Tool, ToolContext, ToolError

DEFAULT_TOOLS = ("python", "search", "read_file", "write_file", "list_files")
SYSTEM_PROMPT = (
    "You are a capable assistant that solves tasks step by step with the tools provided. Call a tool "
    "when it helps; read its result; if a call fails, fix it and try again. When you are done, reply "
    "with the final answer and no tool call."
)


@dataclass
class AgentState:
    """Counters that persist across turns (``run`` calls)."""

    turns: int = 0
    steps: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    calls_by_tool: dict[str, int] = field(default_factory=dict)
    last_error: str = ""


@dataclass
class AgentResult:
    answer: str
    stop_reason: str  # "answer", "step_budget", "time_budget" or "backend_error"
    steps: int
    messages: list[dict[str, Any]]


class Agent:
    """Runs tasks with a model ``backend`` and ``tools`` (names from the plugin registry, or Tools).

    Tool results longer than ``max_result_chars`` are cut before the model sees them.
    ``tool_options`` reach tool factories through ``ToolContext.options`` (e.g. ``docs`` for search,
    ``timeout_s``/``persistent``/``network``/``limits`` for python). ``transcript`` is a JSONL path.
    The time budget is checked before each model turn and caps each tool call; a model call already
    under way is not interrupted (give the backend its own timeout).
    """

    def __init__(
        self,
        backend: Backend,
        tools: Iterable[str | Tool] = DEFAULT_TOOLS,
        *,
        workspace: str | os.PathLike | None = None,
        system_prompt: str | None = SYSTEM_PROMPT,
        max_steps: int = 10,
        time_budget_s: float = 300.0,
        transcript: str | os.PathLike | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_text: OnText | None = None,
        tool_options: Mapping[str, Any] | None = None,
        plugins: Plugins | None = None,
        max_result_chars: int = 20_000,
    ):
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        if time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive, got {time_budget_s}")
        self.backend = backend
        self.max_steps, self.time_budget_s = max_steps, time_budget_s
        self.max_result_chars = max_result_chars
        self.on_event, self.on_text = on_event, on_text
        self._owns_workspace = workspace is None
        self.workspace = Path(workspace or tempfile.mkdtemp(prefix="keye-agent-")).resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        tools = list(tools)
        needs_registry = any(isinstance(t, str) for t in tools)
        plugins = plugins or (load_plugins() if needs_registry else None)
        self.context = ToolContext(
            self.workspace, dict(tool_options or {}), plugins.search_backends() if plugins else {}
        )
        self.tools = self._build_tools(tools, plugins.tools() if plugins else {})
        self.messages: list[dict[str, Any]] = (
            [{"role": "system", "content": system_prompt}] if system_prompt else []
        )
        self.state = AgentState()
        self.transcript: list[dict[str, Any]] = []
        self._transcript_file = open(transcript, "a", encoding="utf-8") if transcript else None  # noqa: SIM115
        self._t0 = time.monotonic()

    def _build_tools(self, requested: list[str | Tool], registry: Mapping[str, Any]) -> dict[str, Tool]:
        built: dict[str, Tool] = {}
        for entry in requested:
            if isinstance(entry, Tool):
                tool = entry
            elif entry in registry:
                component = registry[entry]
                tool = component if isinstance(component, Tool) else component(self.context)
                if not isinstance(tool, Tool):
                    raise TypeError(f"tool factory {entry!r} returned {type(tool).__name__}, expected a Tool")
                tool = tool.renamed(entry)
            else:
                available = ", ".join(sorted(registry)) or "none"
                raise KeyError(
                    f"no tool named {entry!r}; available: {available} (installed and allowed plugins)"
                )
            if tool.name in built:
                raise ValueError(f"tool {tool.name!r} was given twice")
            built[tool.name] = tool
        return built

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop tool sessions (the sandbox), close the transcript, and delete the workspace when it was
        a temporary one made by the agent."""
        self.context.close()
        if self._owns_workspace:
            shutil.rmtree(self.workspace, ignore_errors=True)
        if self._transcript_file is not None:
            self._transcript_file.close()
            self._transcript_file = None

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop ------------------------------------------------------------------------------
    def run(self, task: str) -> AgentResult:
        """Work on ``task`` (a new user turn in the same conversation) until an answer or a budget."""
        if self.state.turns == 0:
            self._log(
                "start",
                tools=list(self.tools),
                workspace=str(self.workspace),
                max_steps=self.max_steps,
                time_budget_s=self.time_budget_s,
                system_prompt=self.messages[0]["content"] if self.messages else None,
            )
        self.state.turns += 1
        self.messages.append({"role": "user", "content": task})
        self._log("task", content=task)
        deadline = time.monotonic() + self.time_budget_s
        self.context.deadline = deadline
        schemas = [t.schema() for t in self.tools.values()]
        stop, answer, steps = "step_budget", "", 0
        for _ in range(self.max_steps):
            if time.monotonic() >= deadline:
                stop = "time_budget"
                break
            steps += 1
            self.state.steps += 1
            try:
                reply = self.backend.complete(self.messages, schemas, on_text=self.on_text)
            except BackendError as exc:
                self._log("backend_error", error=str(exc))
                stop = "backend_error"
                break
            self._record_reply(reply)
            if not reply.tool_calls and not reply.errors:
                stop, answer = "answer", reply.content
                break
            for call in reply.tool_calls:
                self._run_call(call)
        self._log("stop", reason=stop, answer=answer, steps=steps)
        return AgentResult(answer, stop, steps, self.messages)

    def _record_reply(self, reply: Reply) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in reply.tool_calls]
        self.messages.append(message)
        self._log(
            "model",
            content=reply.content,
            reasoning=reply.reasoning or None,
            tool_calls=[{"id": c.id, "name": c.name, "arguments": c.arguments} for c in reply.tool_calls],
            usage=reply.usage or None,
        )
        if reply.errors:
            self.state.tool_errors += len(reply.errors)
            lines = [f"- {e.message}; you wrote: {e.raw[:500]}" for e in reply.errors]
            feedback = (
                "Some of your tool calls could not be understood and were not run:\n"
                + "\n".join(lines)
                + "\n"
                'Write each call as <tool_call>{"name": ..., "arguments": {...}}</tool_call> with valid JSON.'
            )
            self.state.last_error = feedback
            self.messages.append({"role": "user", "content": feedback})
            self._log("parse_error", errors=[{"raw": e.raw, "message": e.message} for e in reply.errors])

    def _run_call(self, call: ToolCall) -> None:
        self.state.tool_calls += 1
        self.state.calls_by_tool[call.name] = self.state.calls_by_tool.get(call.name, 0) + 1
        started = time.monotonic()
        tool = self.tools.get(call.name)
        ok = False
        try:
            if tool is None:
                raise ToolError(
                    f"there is no tool named {call.name!r}; the tools are {', '.join(self.tools)}"
                )
            result, ok = tool(call.arguments), True
        except ToolError as exc:
            result = f"Error: {exc}"
        except Exception as exc:  # a tool's own bug or bad input: the model reads it and adapts
            result = f"Error: {call.name} raised {type(exc).__name__}: {exc}"
        if len(result) > self.max_result_chars:  # keep the context window for the work, not one dump
            cut = len(result) - self.max_result_chars
            result = result[: self.max_result_chars] + f"\n[... {cut} more characters cut; ask for less]"
        if not ok:
            self.state.tool_errors += 1
            self.state.last_error = result
            result += "\nFix the call (or try another approach) and continue."
        self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})
        self._log(
            "tool",
            id=call.id,
            name=call.name,
            arguments=call.arguments,
            ok=ok,
            result=result,
            seconds=round(time.monotonic() - started, 3),
        )

    def _log(self, event: str, **fields: Any) -> None:
        record = {
            "event": event,
            "turn": self.state.turns,
            "step": self.state.steps,
            "t": round(time.monotonic() - self._t0, 3),
            **{k: v for k, v in fields.items() if v is not None},
        }
        self.transcript.append(record)
        if self._transcript_file is not None:
            self._transcript_file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._transcript_file.flush()
        if self.on_event is not None:
            self.on_event(record)
