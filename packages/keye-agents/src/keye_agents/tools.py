"""The ``tool`` decorator: a plain Python function becomes a tool with a JSON schema and checked calls.

Why: a tool's schema is what the model sees, so it is derived from the function's type hints and
docstring (one source of truth), and every call is validated against it before the function runs, so a
wrong call comes back to the model as an error message it can correct rather than a Python traceback.
"""

from __future__ import annotations

import inspect
import json
import re
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jsonschema


class ToolError(Exception):
    """Raised by a tool (or on its behalf) with a message meant for the model to read."""


@dataclass
class ToolContext:
    """What a tool factory may need: the agent's workspace, the user's options for tools, the search
    backends, the run's deadline (``time.monotonic()`` seconds) and a place to register cleanup."""

    workspace: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    search_backends: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    deadline: float | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def remaining_s(self, cap: float) -> float:
        """Seconds a tool may still spend: ``cap``, cut to what is left of the run's time budget."""
        if self.deadline is None:
            return cap
        return max(min(cap, self.deadline - time.monotonic()), 0.1)

    def close(self) -> None:
        while self.closers:
            self.closers.pop()()


@dataclass(frozen=True)
class Tool:
    """A callable the model may use: ``name``, ``description``, JSON-schema ``parameters`` and ``fn``."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]

    def __post_init__(self):
        jsonschema.Draft202012Validator.check_schema(self.parameters)

    def schema(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry for this tool."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def renamed(self, name: str) -> Tool:
        return self if name == self.name else replace(self, name=name)

    def validate(self, arguments: Mapping[str, Any]) -> None:
        """Raise ToolError listing every way ``arguments`` break the schema."""
        validator = jsonschema.Draft202012Validator(self.parameters)
        problems = sorted(validator.iter_errors(dict(arguments)), key=lambda e: list(e.absolute_path))
        if problems:
            lines = []
            for err in problems:
                where = "/".join(str(p) for p in err.absolute_path)
                lines.append(f"{where}: {err.message}" if where else err.message)
            raise ToolError(f"invalid arguments for tool {self.name!r}: " + "; ".join(lines))

    def __call__(self, arguments: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
        """Validate then run; the result is text (non-strings are JSON-encoded) for the model."""
        args = {**(arguments or {}), **kwargs}
        self.validate(args)
        result = self.fn(**args)
        if isinstance(result, str):
            return result
        return json.dumps(result, ensure_ascii=False, default=str)


_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _schema_for(hint: Any, where: str) -> dict[str, Any]:
    """JSON schema of one type hint; unsupported hints fail naming the parameter."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    if hint is Path:
        return {"type": "string"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        schema = _schema_for(args[0], where)
        extra = [a for a in args[1:] if isinstance(a, str)]
        return {**schema, "description": extra[0]} if extra else schema
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _schema_for(options[0], where)
        return {"anyOf": [_schema_for(a, where) for a in options]}
    if origin is tuple and args and args[-1] is not Ellipsis:
        items = [_schema_for(a, where) for a in args]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set):
        return {"type": "array", "items": _schema_for(args[0], where)} if args else {"type": "array"}
    if origin is dict or hint is dict:
        return {"type": "object"}
    raise TypeError(f"tool parameter {where}: cannot express type {hint!r} as JSON schema")


_ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters)\s*:\s*$")
_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Summary (text before the Args section) and Google-style parameter descriptions."""
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    summary: list[str] = []
    params: dict[str, str] = {}
    current = None
    in_args = False
    indent = None
    for line in lines:
        if _ARGS_HEADER.match(line):
            in_args = True
            continue
        if not in_args:
            summary.append(line)
            continue
        if line.strip() and not line.startswith(" ") and line.rstrip().endswith(":"):
            break  # the next section (Returns:, Raises:, ...)
        m = _ARG_LINE.match(line)
        this_indent = len(line) - len(line.lstrip())
        if m and (indent is None or this_indent <= indent):
            indent = this_indent
            current = m.group(1).lstrip("*")
            params[current] = m.group(3).strip()
        elif current and line.strip():
            params[current] = f"{params[current]} {line.strip()}".strip()
    return "\n".join(summary).strip(), params


def build_tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> Tool:
    """Derive a Tool from a function's signature, type hints and docstring."""
    summary, param_docs = _parse_docstring(inspect.getdoc(fn) or "")
    hints = typing.get_type_hints(fn, include_extras=True)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {fn.__name__}: *args/**kwargs cannot be described by a schema")
        schema = _schema_for(hints.get(pname, inspect.Parameter.empty), f"{fn.__name__}.{pname}")
        if pname in param_docs and "description" not in schema:
            schema["description"] = param_docs[pname]
        if param.default is inspect.Parameter.empty:
            required.append(pname)
        elif param.default is not None and _json_safe(param.default):
            schema["default"] = param.default
        properties[pname] = schema
    parameters = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    return Tool(
        name=name or fn.__name__,
        description=description if description is not None else summary,
        parameters=parameters,
        fn=fn,
    )


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None):
    """Decorator: ``@tool`` or ``@tool(name=..., description=...)`` turns a function into a Tool."""
    if fn is None:
        return lambda f: build_tool(f, name=name, description=description)
    return build_tool(fn, name=name, description=description)
