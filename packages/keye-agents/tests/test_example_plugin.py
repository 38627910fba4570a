"""A third-party tool plugin, installed at test time, is discovered and used with no change to Keye."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "keye-unitconv"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(EXAMPLE, root / "src")  # build in a copy: no build files in the repository
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(source)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return target


def keye_agents(target, *args):
    env = {**os.environ, "PYTHONPATH": str(target), "KEYE_PLUGINS": "keye-agents,unitconv"}
    return subprocess.run(
        [sys.executable, "-m", "keye_agents.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_plugin_tool_is_listed(installed):
    done = keye_agents(installed, "tools")
    assert done.returncode == 0, done.stderr
    assert "convert_units\tunitconv (keye-unitconv 0.1.0)" in done.stdout


def test_plugin_tool_is_used_by_an_agent_run(installed, tmp_path):
    def convert(value, from_unit, to_unit):
        args = {"value": value, "from_unit": from_unit, "to_unit": to_unit}
        return f"<tool_call>{json.dumps({'name': 'convert_units', 'arguments': args})}</tool_call>"

    replies = [convert(10, "km", "mi"), convert(1, "kg", "km"), "10 km is about 6.2 miles."]
    script = tmp_path / "script.json"
    script.write_text(json.dumps(replies))
    done = keye_agents(
        installed, "run", "10 km in miles?", "--backend", "scripted", "--script", str(script),
        "--tools", "convert_units", "--workspace", str(tmp_path / "ws"), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    tools = [e for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "tool"]
    assert tools[0]["ok"] and tools[0]["result"] == "10 km = 6.21371 mi"
    assert not tools[1]["ok"] and "cannot convert kg to km" in tools[1]["result"]


def test_without_the_entry_point_allowed_the_tool_is_absent(installed):
    env = {**os.environ, "PYTHONPATH": str(installed), "KEYE_PLUGINS": "keye-agents"}
    done = subprocess.run(
        [sys.executable, "-m", "keye_agents.cli", "tools"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "convert_units" not in done.stdout
