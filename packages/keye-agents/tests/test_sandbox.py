"""Hostile code must end with a clear result and leave the host untouched (small limits: 2-core CI)."""

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from keye_agents import Sandbox, SandboxLimits, SandboxUnavailable
from keye_agents import sandbox as sandbox_module

try:
    sandbox_module.namespace_flags(network=False)
    ISOLATION = ""
except SandboxUnavailable as exc:
    ISOLATION = str(exc)
isolated = pytest.mark.skipif(bool(ISOLATION), reason=f"namespaces unavailable here: {ISOLATION}")

SMALL = SandboxLimits(cpu_s=2, memory_mb=256, file_size_mb=1, max_processes=16, max_output_bytes=4096)


def nobody_processes() -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                uid_line = next(
                    line for line in (entry / "status").read_text().splitlines() if line.startswith("Uid:")
                )
            except (OSError, StopIteration):
                continue
            count += uid_line.split()[1] == "65534"
    return count


@pytest.fixture
def box(tmp_path):
    with Sandbox(tmp_path / "ws", limits=SMALL) as sb:
        yield sb


@isolated
def test_runs_code_in_its_workspace_and_prints_final_expression(box):
    result = box.run("import os\nopen('out.txt', 'w').write('hi')\nprint(os.getcwd())\n6 * 7", timeout_s=10)
    assert result.ok, result
    assert result.stdout == f"{box.workspace}\n42\n"
    assert (box.workspace / "out.txt").read_text() == "hi"


@isolated
@pytest.mark.skipif(
    os.geteuid() != 0, reason="the workspace is lent to another user only when running as root"
)
def test_workspace_ownership_is_given_back_after_each_run(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "given.txt").write_text("from the agent")
    os.chown(ws / "given.txt", 1234, 1234)
    with Sandbox(ws, limits=SMALL, persistent=True) as sb:
        code = "open('given.txt', 'a').write(' + sandbox')\nimport os\nos.makedirs('new/deeper')\n"
        code += "open('new/f', 'w')"
        assert sb.run(code, timeout_s=10).ok
        owners = {p.relative_to(ws).as_posix(): (p.stat().st_uid, p.stat().st_gid) for p in ws.rglob("*")}
        assert owners == {"given.txt": (1234, 1234), "new": (0, 0), "new/deeper": (0, 0), "new/f": (0, 0)}
        assert sb.run("print(open('given.txt').read())", timeout_s=10).stdout == "from the agent + sandbox\n"


@isolated
def test_exception_gives_traceback_and_exit_code_1(box):
    result = box.run("def f():\n    raise ValueError('bad input')\nf()", timeout_s=10)
    assert result.exit_code == 1 and not result.timed_out
    assert "ValueError: bad input" in result.stderr and 'File "<cell>", line 2' in result.stderr


@isolated
def test_persistent_session_keeps_state_until_a_timeout_resets_it(tmp_path):
    with Sandbox(tmp_path, limits=SMALL, persistent=True) as sb:
        assert sb.run("import math\nx = 41", timeout_s=10).ok
        assert sb.run("x + 1", timeout_s=10).stdout == "42\n"
        killed = sb.run("import time\ntime.sleep(60)", timeout_s=1)
        assert killed.timed_out and "session state was lost" in killed.note
        assert "NameError" in sb.run("x", timeout_s=10).stderr


@isolated
def test_one_shot_runs_do_not_share_state(box):
    box.run("x = 1", timeout_s=10)
    assert "NameError" in box.run("x", timeout_s=10).stderr


@isolated
def test_infinite_loop_hits_the_cpu_limit(box):
    started = time.monotonic()
    result = box.run("while True:\n    pass", timeout_s=20)
    assert result.exit_code == -24 and "CPU-time limit of 2 s" in result.note
    assert time.monotonic() - started < 15


@isolated
def test_sleeping_forever_hits_the_wall_time_limit(box):
    result = box.run("import time\ntime.sleep(3600)", timeout_s=1)
    assert result.timed_out and result.exit_code is None and "wall-time limit of 1 s" in result.note


@isolated
def test_fork_bomb_is_contained_and_leaves_no_process(box):
    before = nobody_processes()
    result = box.run(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout_s=2
    )
    assert result.timed_out
    for _ in range(50):  # the namespace's processes are reaped by the kernel right after
        if nobody_processes() <= before:
            break
        time.sleep(0.1)
    assert nobody_processes() <= before


@isolated
def test_memory_hog_gets_memory_error(box):
    result = box.run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 2**20))", timeout_s=20)
    assert result.exit_code == 1 and "MemoryError" in result.stderr


@isolated
def test_network_connection_is_impossible(box):
    server = socket.create_server(("127.0.0.1", 0))  # a listener on the host's own loopback
    port = server.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    result = box.run(code, timeout_s=10)
    server.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing ever reached it
        server.accept()
    server.close()
    assert result.exit_code == 1 and "connected" not in result.stdout
    assert "Network is unreachable" in result.stderr


@isolated
def test_writes_outside_the_workspace_never_reach_the_host(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "link").symlink_to(outside)
    tag = uuid.uuid4().hex
    targets = [
        "../escape.txt",
        "link/escape.txt",
        f"/tmp/keye-escape-{tag}",
        f"/var/tmp/keye-escape-{tag}",
        f"/dev/shm/keye-escape-{tag}",
        str(Path(__file__).with_name(f"escape-{tag}")),
    ]
    code = (
        f"for t in {targets!r}:\n"
        "    try:\n"
        "        open(t, 'w').write('pwned')\n"
        "        print(t, 'written-inside-sandbox')\n"
        "    except OSError as e:\n"
        "        print(t, 'refused', type(e).__name__)\n"
    )
    with Sandbox(ws, limits=SMALL) as sb:
        result = sb.run(code, timeout_s=10)
    assert result.ok, result
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for t in ["../escape.txt", "link/escape.txt", targets[-1]]:
        assert lines[t].startswith("refused"), (t, lines[t])
    for t in targets:
        host_path = (ws / t) if not t.startswith("/") else Path(t)
        assert not host_path.exists(), f"{t} reached the host"
    assert list(outside.iterdir()) == []


@isolated
def test_parent_environment_secrets_are_invisible(box, monkeypatch):
    monkeypatch.setenv("KEYE_TEST_SECRET_TOKEN", "tok-" + uuid.uuid4().hex)
    code = (
        "import os, glob\n"
        "print('env', 'KEYE_TEST_SECRET_TOKEN' in os.environ)\n"
        "seen = []\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        seen.append(b'KEYE_TEST_SECRET_TOKEN' in open(p, 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
        "print('proc', any(seen), len(seen))\n"
        "print('home', os.listdir(os.path.expanduser('~')) == os.listdir('.'))\n"
    )
    result = box.run(code, timeout_s=10)
    assert result.ok, result
    assert "env False" in result.stdout and "proc False" in result.stdout
    assert os.environ["KEYE_TEST_SECRET_TOKEN"] not in result.stdout


@isolated
def test_big_files_and_big_output_are_cut(box):
    big = box.run("open('big.bin', 'wb').write(b'x' * 2 * 2**20)", timeout_s=10)
    assert big.exit_code == 1 and "File too large" in big.stderr
    loud = box.run("print('y' * 100_000)", timeout_s=10)
    assert loud.truncated and len(loud.stdout) < 4200 and "more bytes not shown" in loud.stdout


@isolated
def test_hard_exit_and_signals_are_reported(box):
    exited = box.run("import os\nos._exit(5)", timeout_s=10)
    assert exited.exit_code == 5 and "exited with code 5" in exited.note
    crashed = box.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", timeout_s=10)
    assert crashed.exit_code == -11 and "SIGSEGV" in crashed.note


def test_refuses_without_network_isolation_unless_opted_out(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox_module, "_probe", lambda flags: "unshare: Operation not permitted")
    with pytest.raises(SandboxUnavailable, match=r"own network namespace.*Sandbox\(network=True\)"):
        Sandbox(tmp_path)
    with Sandbox(tmp_path, network=True, limits=SMALL) as sb:
        assert "only resource limits apply" in sb.warning
        assert sb.prefix == []
        assert sb.run("print(1 + 1)", timeout_s=10).stdout == "2\n"


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="SandboxLimits.cpu_s must be a positive int"):
        SandboxLimits(cpu_s=0)
    if not ISOLATION:
        with Sandbox(tmp_path) as sb, pytest.raises(ValueError, match="timeout_s must be positive"):
            sb.run("1", timeout_s=0)


@pytest.mark.parametrize("namespaces", [True, False])
def test_a_background_process_neither_delays_the_result_nor_outlives_the_run(
    namespaces, monkeypatch, tmp_path
):
    if namespaces and ISOLATION:
        pytest.skip(ISOLATION)
    if not namespaces:
        monkeypatch.setattr(sandbox_module, "_probe", lambda flags: "disabled for this test")
    code = "import os\nif os.fork() == 0:\n    os.execv('/bin/sleep', ['sleep', '37'])\nprint('started')"
    started = time.monotonic()
    with Sandbox(tmp_path, limits=SMALL, network=not namespaces) as sb:
        result = sb.run(code, timeout_s=20)
    assert result.ok and result.stdout == "started\n", result
    assert time.monotonic() - started < 10
    time.sleep(0.2)
    assert not [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p) == b"sleep\x0037\x00"]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@isolated
def test_the_code_cannot_undo_its_confinement(box):
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('umount', libc.umount2(b'/tmp', 0), ctypes.get_errno())\n"
        "lines = open('/proc/self/status').read().splitlines()\n"
        "status = dict(line.split(':\\t') for line in lines if ':\\t' in line)\n"
        "root = status['Uid'].split()[0] == '0'\n"
        "print('caps', status['CapEff'], status['CapBnd'] if root else 'not-root')\n"
        "print('nnp', status['NoNewPrivs'])\n"
    )
    result = box.run(code, timeout_s=10)
    assert result.ok, result
    lines = result.stdout.splitlines()
    assert lines[0] == "umount -1 1"  # EPERM
    assert lines[1] in ("caps 0000000000000000 not-root", "caps 0000000000000000 0000000000000000")
    assert lines[2] == "nnp 1"
