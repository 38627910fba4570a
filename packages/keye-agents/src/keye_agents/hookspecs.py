"""Hooks that keye-agents consumes (DESIGN §2): each returns a dict of name -> component.

A plugin package declares ``[project.entry-points.keye] myname = "mypkg.module"`` and implements any of
these in that module with ``@pluggy.HookimplMarker("keye")``.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("keye")


@hookspec
def keye_agent_tools() -> dict[str, Any]:
    """Tools by name: a ``keye_agents.Tool`` (e.g. made with ``@tool``), or a factory called with a
    ``keye_agents.ToolContext`` that returns one (for tools holding state, such as a sandbox session)."""


@hookspec
def keye_agent_backends() -> dict[str, Any]:
    """Model backends by name: factories called with keyword options (``base_url``, ``model``, ...)
    returning an object with ``complete(messages, tools, *, on_text=None) -> keye_agents.Reply``."""


@hookspec
def keye_agent_search_backends() -> dict[str, Any]:
    """Search backends by name (for the ``search`` tool): factories called with a ``ToolContext``
    returning an object with ``search(query, k) -> list[keye_agents.SearchHit]``; web search plugs in here."""
