from typing import Annotated, Literal

import pytest

from keye_agents import Tool, ToolError, tool


@tool
def find(
    query: str, k: int = 5, fields: list[str] | None = None, mode: Literal["any", "all"] = "any"
) -> dict:
    """Find records matching a query.

    Longer explanation that stays in the description.

    Args:
        query: words to look for.
        k: how many records,
            at most.
        fields: which fields to search.

    Returns:
        the matches.
    """
    return {"query": query, "k": k, "fields": fields, "mode": mode}


def test_schema_from_hints_and_docstring():
    assert isinstance(find, Tool) and find.name == "find"
    assert (
        find.description
        == "Find records matching a query.\n\nLonger explanation that stays in the description."
    )
    params = find.parameters
    assert params["required"] == ["query"]
    assert params["additionalProperties"] is False
    assert params["properties"]["query"] == {"type": "string", "description": "words to look for."}
    assert params["properties"]["k"] == {
        "type": "integer",
        "description": "how many records, at most.",
        "default": 5,
    }
    assert params["properties"]["fields"] == {
        "type": "array",
        "items": {"type": "string"},
        "description": "which fields to search.",
    }
    assert params["properties"]["mode"] == {"enum": ["any", "all"], "default": "any"}
    assert find.schema()["function"]["name"] == "find"


def test_call_validates_then_runs_and_returns_text():
    assert find({"query": "x", "k": 2}) == '{"query": "x", "k": 2, "fields": null, "mode": "any"}'


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, "'query' is a required property"),
        ({"query": 3}, "query: 3 is not of type 'string'"),
        ({"query": "x", "k": "many"}, "k: 'many' is not of type 'integer'"),
        ({"query": "x", "mode": "some"}, "mode: 'some' is not one of ['any', 'all']"),
        ({"query": "x", "extra": 1}, "Additional properties are not allowed ('extra' was unexpected)"),
    ],
)
def test_bad_arguments_are_refused_before_the_call(arguments, expected):
    with pytest.raises(ToolError, match="invalid arguments for tool 'find'") as info:
        find(arguments)
    assert expected in str(info.value)


def test_decorator_with_options_and_annotated_description():
    @tool(name="add_numbers", description="Add two numbers.")
    def add(a: Annotated[float, "first addend"], b: float) -> float:
        return a + b

    assert add.name == "add_numbers" and add.description == "Add two numbers."
    assert add.parameters["properties"]["a"] == {"type": "number", "description": "first addend"}
    assert add({"a": 1.5, "b": 2}) == "3.5"


def test_unsupported_hint_names_the_parameter():
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"tool parameter f\.thing"):

        @tool
        def f(thing: Opaque) -> str:
            return ""


def test_var_kwargs_are_refused():
    with pytest.raises(TypeError, match=r"\*args/\*\*kwargs"):

        @tool
        def f(**kwargs) -> str:
            return ""


def test_tuple_schema_is_fixed_length():
    @tool
    def point(p: tuple[int, int]) -> str:
        return str(p)

    assert point({"p": [1, 2]}) == "[1, 2]"
    with pytest.raises(ToolError):
        point({"p": [1, 2, 3]})
