import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keye_agents.cli import main

PACKAGE = Path(__file__).resolve().parents[1]


def script(tmp_path, replies) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(replies))
    return str(path)


def test_run_prints_the_transcript_and_writes_jsonl(tmp_path, capsys):
    replies = [
        '<tool_call>{"name": "python", "arguments": {"code": "print(sum(range(10)))"}}</tool_call>',
        "45",
    ]
    transcript = tmp_path / "t.jsonl"
    code = main(
        ["run", "Sum 0..9", "--backend", "scripted", "--script", script(tmp_path, replies),
         "--tools", "python", "--workspace", str(tmp_path / "ws"), "--transcript", str(transcript),
         "--cpu", "5"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert '-> python({"code": "print(sum(range(10)))"})' in out
    assert "<- python [ok," in out and "stdout:\n45" in out
    assert out.rstrip().endswith("## stopped: answer after 2 steps\n45")
    events = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "task", "model", "tool", "model", "stop"]
    assert events[0]["tools"] == ["python"] and events[0]["workspace"] == str(tmp_path / "ws")
    assert out.startswith(f"## tools: python; workspace {tmp_path / 'ws'}")


def test_run_json_mode_and_step_budget_exit_code(tmp_path, capsys):
    replies = ['<tool_call>{"name": "list_files", "arguments": {}}</tool_call>'] * 2
    code = main(
        ["run", "x", "--backend", "scripted", "--script", script(tmp_path, replies), "--tools", "list_files",
         "--workspace", str(tmp_path), "--max-steps", "2", "--json"]
    )  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and lines[-1]["reason"] == "step_budget"


def test_unknown_backend_and_bad_option_are_explained(tmp_path):
    with pytest.raises(SystemExit, match="no backend 'nope'; available: .*openai"):
        main(["run", "x", "--backend", "nope"])
    with pytest.raises(SystemExit, match="needs a checkpoint .* or a preset"):
        main(["serve", "--backend", "local"])
    with pytest.raises(SystemExit, match="backend 'scripted': .*No such file"):
        main(["run", "x", "--backend", "scripted", "--script", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="backend 'scripted' does not take these options"):
        main(
            ["run", "x", "--backend", "scripted", "--script", script(tmp_path, []), "--base-url", "http://x"]
        )


def test_tools_lists_builtin_tools_with_their_plugin(capsys):
    main(["tools"])
    out = capsys.readouterr().out
    assert "python\tkeye-agents (keye-agents " in out and "search\t" in out


def test_serve_command_answers_the_openai_client(tmp_path):
    openai = pytest.importorskip("openai")
    replies = ['<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>']
    exe = shutil.which("keye-agents", path=str(Path(sys.executable).parent)) or "keye-agents"
    proc = subprocess.Popen(
        [exe, "serve", "--backend", "scripted", "--script", script(tmp_path, replies), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "KEYE_PLUGINS": "keye-agents"},
    )
    try:
        url = proc.stdout.readline().split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        response = api.chat.completions.create(model="keye", messages=[{"role": "user", "content": "time?"}])
        call = response.choices[0].message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {"zone": "UTC"})
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_task_from_stdin_and_custom_system_prompt(tmp_path, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Summarise the notes."))
    path = script(tmp_path, ["Done."])
    code = main(
        ["run", "-", "--backend", "scripted", "--script", path, "--tools", "", "--workspace", str(tmp_path),
         "--system-prompt", "Answer in one word.", "--json"]
    )  # fmt: skip
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert events[0]["system_prompt"] == "Answer in one word." and events[0]["tools"] == []
    assert events[1]["content"] == "Summarise the notes."
