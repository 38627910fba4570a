"""keye-agents: an agent runtime for code, tool and search work, with tools as plugins (DESIGN §9)."""

from keye_agents.agent import Agent, AgentResult, AgentState
from keye_agents.backends import BackendError, LocalBackend, OpenAIBackend, Reply, ScriptedBackend
from keye_agents.plugins import PluginError, load_plugins
from keye_agents.sandbox import Sandbox, SandboxLimits, SandboxResult, SandboxUnavailable
from keye_agents.search import LocalSearch, SearchHit
from keye_agents.toolcalls import ParsedReply, ToolCall, ToolCallError, parse_tool_calls, render_tool_calls
from keye_agents.tools import Tool, ToolContext, ToolError, tool
from keye_agents.workspace import Workspace

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentResult",
    "AgentState",
    "BackendError",
    "LocalBackend",
    "LocalSearch",
    "OpenAIBackend",
    "ParsedReply",
    "PluginError",
    "Reply",
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "ScriptedBackend",
    "SearchHit",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolContext",
    "ToolError",
    "Workspace",
    "load_plugins",
    "parse_tool_calls",
    "render_tool_calls",
    "tool",
]
