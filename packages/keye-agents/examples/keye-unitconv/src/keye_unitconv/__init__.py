"""An example third-party keye-agents plugin: one tool, registered through the ``keye`` entry point."""

from __future__ import annotations

from typing import Literal

import pluggy

from keye_agents import ToolError, tool

hookimpl = pluggy.HookimplMarker("keye")

Unit = Literal["m", "km", "mi", "ft", "kg", "lb", "c", "f"]
_TO_BASE = {"m": 1.0, "km": 1000.0, "mi": 1609.344, "ft": 0.3048, "kg": 1.0, "lb": 0.45359237}
_KIND = {"m": "length", "km": "length", "mi": "length", "ft": "length", "kg": "mass", "lb": "mass"}


@tool
def convert_units(value: float, from_unit: Unit, to_unit: Unit) -> str:
    """Convert a quantity between units of length, mass or temperature.

    Args:
        value: the number to convert.
        from_unit: unit of ``value``.
        to_unit: unit wanted.
    """
    if {from_unit, to_unit} <= {"c", "f"}:
        result = value * 9 / 5 + 32 if (from_unit, to_unit) == ("c", "f") else value
        result = (value - 32) * 5 / 9 if (from_unit, to_unit) == ("f", "c") else result
    elif from_unit in _KIND and to_unit in _KIND and _KIND[from_unit] == _KIND[to_unit]:
        result = value * _TO_BASE[from_unit] / _TO_BASE[to_unit]
    else:
        raise ToolError(f"cannot convert {from_unit} to {to_unit}: different kinds of quantity")
    return f"{value:g} {from_unit} = {result:.6g} {to_unit}"


@hookimpl
def keye_agent_tools():
    return {"convert_units": convert_units}
