"""The ``python`` tool: model-written code runs in a Sandbox over the agent's workspace."""

from __future__ import annotations

from keye_agents.sandbox import Sandbox, SandboxLimits
from keye_agents.tools import Tool, ToolContext, build_tool


def python_tool(ctx: ToolContext) -> Tool:
    """Options: ``timeout_s`` (default 30), ``persistent`` (default True: variables survive between
    calls), ``network`` (default False), ``limits`` (a SandboxLimits)."""
    opts = ctx.options
    sandbox = Sandbox(
        ctx.workspace,
        limits=opts.get("limits") or SandboxLimits(),
        persistent=opts.get("persistent", True),
        network=opts.get("network", False),
    )
    ctx.closers.append(sandbox.close)
    cap = float(opts.get("timeout_s", 30.0))

    def python(code: str) -> str:
        """Run Python code in a sandbox (no network; the working directory is the workspace). Variables
        and imports persist between calls; the value of a final expression is printed.

        Args:
            code: the Python source to run.
        """
        return sandbox.run(code, timeout_s=ctx.remaining_s(cap)).as_text()

    return build_tool(python)
