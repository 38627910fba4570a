"""keye-agents' own ``keye`` entry point: the built-in tools, model backends and search backend."""

from __future__ import annotations

from typing import Any

import pluggy

from keye_agents.backends import LocalBackend, OpenAIBackend, ScriptedBackend
from keye_agents.code_tool import python_tool
from keye_agents.search import local_search_backend, search_tool
from keye_agents.tools import Tool, ToolContext
from keye_agents.workspace import file_tools

hookimpl = pluggy.HookimplMarker("keye")


def _file_tool(name: str):
    def factory(ctx: ToolContext) -> Tool:
        return file_tools(ctx)[name]

    return factory


def _local_backend(model_path: str | None = None, preset: str | None = None, **kwargs: Any) -> LocalBackend:
    if model_path:
        return LocalBackend.from_pretrained(model_path, **kwargs)
    if preset:
        return LocalBackend.from_preset(preset, **kwargs)
    raise ValueError(
        "the local backend needs a checkpoint (model_path / --model-path) or a preset (--preset tiny)"
    )


@hookimpl
def keye_agent_tools() -> dict[str, Any]:
    tools: dict[str, Any] = {"python": python_tool, "search": search_tool}
    tools.update({name: _file_tool(name) for name in ("read_file", "write_file", "list_files")})
    return tools


@hookimpl
def keye_agent_backends() -> dict[str, Any]:
    return {"openai": OpenAIBackend, "local": _local_backend, "scripted": ScriptedBackend.from_file}


@hookimpl
def keye_agent_search_backends() -> dict[str, Any]:
    return {"local": local_search_backend}
