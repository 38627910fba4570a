"""Runs untrusted Python in a separate, confined process (DESIGN §9).

Why each layer: the code comes from a model, so nothing it does may reach the host. Linux namespaces
(via util-linux ``unshare``) give it no network, its own PID space (a fork bomb dies with the sandbox;
host processes and their environments are invisible) and its own mounts (empty private /tmp, /var/tmp,
/dev/shm, /root, /home). As root it then runs as ``nobody``, so RLIMIT_NPROC binds and files outside
its workspace are read-only to it. Resource limits cap CPU, address space, file size, processes and
open files; the parent enforces wall time and output size, and passes only a scrubbed environment.
Where namespaces are not allowed it refuses to run unless the caller opts out of network isolation
(``network=True``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("_sandbox_worker.py")
# Folders the sandbox sees as private and empty: world-writable ones, and homes (secrets, the parent's files).
MASKED = (("/tmp", "1777"), ("/var/tmp", "1777"), ("/dev/shm", "1777"), ("/run/lock", "1777"))
MASKED += (("/root", "0755"), ("/home", "0755"))
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}


class SandboxUnavailable(RuntimeError):
    """This machine does not allow the isolation the caller asked for."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-call CPU seconds, address space, largest file, processes, open files and kept output."""

    cpu_s: int = 10
    memory_mb: int = 1024
    file_size_mb: int = 64
    max_processes: int = 64
    max_open_files: int = 256
    max_output_bytes: int = 64 * 1024
    session_cpu_s: int = 600

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive int, got {value!r}")


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool = False
    truncated: bool = False
    note: str = ""  # why the run ended, when the code did not end it itself

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def as_text(self) -> str:
        """A compact report for a model: status line, then stdout and stderr."""
        status = "timed out" if self.timed_out else f"exit code {self.exit_code}"
        parts = [f"[{status}{'; ' + self.note if self.note else ''}]"]
        if self.stdout:
            parts.append(f"stdout:\n{self.stdout}")
        if self.stderr:
            parts.append(f"stderr:\n{self.stderr}")
        return "\n".join(parts)


@functools.cache
def _probe(flags: tuple[str, ...]) -> str:
    """Empty string when ``unshare flags -- true`` works here, else the reason it does not."""
    exe = shutil.which("unshare")
    if exe is None:
        return "the util-linux 'unshare' command is not installed"
    try:
        done = subprocess.run([exe, *flags, "--", "true"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    return "" if done.returncode == 0 else f"unshare {' '.join(flags)} failed: {done.stderr.strip()}"


def namespace_flags(network: bool) -> tuple[list[str], str]:
    """The ``unshare`` flags this machine allows, and a warning when isolation had to be reduced.

    Raises SandboxUnavailable when network isolation is required but impossible.
    """
    user = () if os.geteuid() == 0 else ("--user", "--map-root-user")
    base = (*user, "--ipc", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc")
    reason = _probe((*base, "--net"))
    if not reason:
        return ["unshare", *base] + ([] if network else ["--net"]), ""
    if not network:
        raise SandboxUnavailable(
            f"cannot give the sandbox its own network namespace ({reason}); refusing to run code with "
            "network access. Run as root or enable unprivileged user namespaces, or opt out with "
            "Sandbox(network=True) / --sandbox-network."
        )
    if not _probe(base):
        return ["unshare", *base], ""
    return [], f"no namespaces available ({reason}): only resource limits apply"


def _sandbox_identity() -> tuple[int | None, int | None]:
    """As root, run as ``nobody`` so that process limits bind and host files stay read-only."""
    if os.geteuid() != 0:
        return None, None
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


class _Capture:
    """Keeps the first ``limit`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int):
        self.limit, self.kept, self.dropped = limit, bytearray(), 0

    def add(self, data: bytes) -> None:
        room = self.limit - len(self.kept)
        self.kept += data[: max(room, 0)]
        self.dropped += max(len(data) - max(room, 0), 0)

    def text(self) -> str:
        out = self.kept.decode("utf-8", errors="replace")
        return out + (f"\n[... {self.dropped} more bytes not shown]" if self.dropped else "")


class Sandbox:
    """A confined Python runner; ``persistent=True`` keeps variables and imports across ``run`` calls.

    Use as a context manager (or call ``close``) so the worker process and a temporary workspace go away.
    As root, the workspace is lent to ``nobody`` during each run and every file is given back to its
    owner afterwards (new files to the workspace folder's owner), so ownership looks untouched.
    """

    def __init__(
        self,
        workspace: str | os.PathLike | None = None,
        *,
        limits: SandboxLimits | None = None,
        persistent: bool = False,
        network: bool = False,
        timeout_s: float = 30.0,
        env: dict[str, str] | None = None,
        python: str | None = None,
    ):
        self.limits = limits or SandboxLimits()
        self.persistent = persistent
        self.network = network
        self.timeout_s = float(timeout_s)
        self.python = python or sys.executable
        self.prefix, self.warning = namespace_flags(network)
        self._owns_workspace = workspace is None
        self.workspace = Path(workspace or tempfile.mkdtemp(prefix="keye-sandbox-")).resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.uid, self.gid = _sandbox_identity()
        self.env = {**BASE_ENV, "HOME": str(self.workspace), "TMPDIR": "/tmp", **(env or {})}
        self._proc: subprocess.Popen | None = None
        self._requests = self._responses = None
        self._pending = b""

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._kill()
        if self._owns_workspace:
            shutil.rmtree(self.workspace, ignore_errors=True)

    def reset(self) -> None:
        """Forget the session's state (the next call starts a fresh worker)."""
        self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdout, proc.stderr, self._requests, self._responses):
            if stream is not None:
                stream.close()
        self._requests = self._responses = None
        self._pending = b""

    def _config(self, request_fd: int, response_fd: int) -> dict:
        keep = {str(self.workspace), str(WORKER), sys.prefix, sys.base_prefix, sys.exec_prefix}
        for exe in (self.python, os.path.realpath(self.python)):  # a venv's and its base install's root
            keep.add(os.path.dirname(os.path.dirname(os.path.abspath(exe))))
        keep.update(p for p in sys.path if p and os.path.isdir(p))
        masks = [(m, mode) for m, mode in MASKED if os.path.isdir(m)] if self.prefix else []
        return {
            "workspace": str(self.workspace),
            "masks": masks,
            "keep": sorted(keep),
            "tmp_size_mb": max(self.limits.file_size_mb, 16),
            "uid": self.uid,
            "gid": self.gid,
            "request_fd": request_fd,
            "response_fd": response_fd,
            **{k: getattr(self.limits, k) for k in SandboxLimits.__dataclass_fields__},
        }

    def _workspace_paths(self) -> list[str]:
        paths = []
        for root, dirs, files in os.walk(self.workspace):  # never follows links; lchown never does either
            paths += [root, *(os.path.join(root, n) for n in dirs + files)]
        return paths

    def _lend_workspace(self) -> dict[str, tuple[int, int]]:
        """Hand the workspace to the sandbox user for one run, remembering who owned what."""
        owners: dict[str, tuple[int, int]] = {}
        if self.uid is None:
            return owners
        for path in self._workspace_paths():
            st = os.lstat(path)
            owners[path] = (st.st_uid, st.st_gid)
            os.lchown(path, self.uid, self.gid)
        return owners

    def _return_workspace(self, owners: dict[str, tuple[int, int]]) -> None:
        """Give every file back to its owner; files the run created go to the workspace's owner."""
        if self.uid is None:
            return
        default = owners[str(self.workspace)]
        for path in self._workspace_paths():
            with contextlib.suppress(FileNotFoundError):  # a background process may still be deleting
                os.lchown(path, *owners.get(path, default))

    def _start(self) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        cfg = json.dumps(self._config(req_r, resp_w))
        try:
            self._proc = subprocess.Popen(
                [*self.prefix, self.python, "-I", "-B", str(WORKER), cfg],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(req_r, resp_w),
                cwd=self.workspace,
                env=self.env,
                start_new_session=True,
            )
        finally:
            os.close(req_r)
            os.close(resp_w)
        self._requests = os.fdopen(req_w, "wb")
        self._responses = os.fdopen(resp_r, "rb", buffering=0)

    # -- running code --------------------------------------------------------------------------
    def run(self, code: str, *, timeout_s: float | None = None) -> SandboxResult:
        """Run ``code``; the value of a final expression is printed, as in a notebook."""
        if not isinstance(code, str):
            raise TypeError(f"Sandbox.run: code must be str, got {type(code).__name__}")
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        if timeout <= 0:
            raise ValueError(f"Sandbox.run: timeout_s must be positive, got {timeout_s!r}")
        owners = self._lend_workspace()
        try:
            if self._proc is None:
                self._start()
            out, err = _Capture(self.limits.max_output_bytes), _Capture(self.limits.max_output_bytes)
            try:
                self._requests.write(json.dumps({"code": code}).encode() + b"\n")
                self._requests.flush()
                if not self.persistent:
                    self._requests.close()
            except BrokenPipeError:
                pass  # the worker died already: its report below says how
            result = self._collect(out, err, time.monotonic() + timeout, timeout)
            if not self.persistent or result.exit_code is None or result.note:
                self._kill()
        finally:
            self._return_workspace(owners)
        return result

    def _collect(self, out: _Capture, err: _Capture, deadline: float, timeout: float) -> SandboxResult:
        proc = self._proc
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        sel.register(self._responses, selectors.EVENT_READ, None)
        exit_code: int | None = None
        note, timed_out = "", False
        try:
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    note = f"wall-time limit of {timeout:g} s exceeded; the process was killed"
                    note += "; the session state was lost" if self.persistent else ""
                    break
                for key, _ in sel.select(timeout=remaining):
                    data = os.read(key.fd, 65536)
                    if not data:
                        sel.unregister(key.fileobj)
                    elif key.data is not None:
                        key.data.add(data)
                    else:
                        self._pending += data
                ended = False  # the reaper reported the cell runner's end: nothing more will come
                for report in self._reports():
                    if "died" in report:
                        exit_code, note = self._death(report, exit_code)
                        ended = True
                    else:
                        exit_code = report["exit_code"]
                if ended or (exit_code is not None and self.persistent):
                    self._drain(sel)  # what was written before the report, without waiting for more
                    break
                if out.dropped + err.dropped > 64 * self.limits.max_output_bytes:
                    note = f"output limit exceeded ({self.limits.max_output_bytes} bytes kept per stream)"
                    break
        finally:
            sel.close()
        if exit_code is None and not timed_out and not note:
            note = "the sandbox ended before reporting a result (see stderr)"
        truncated = bool(out.dropped or err.dropped)
        return SandboxResult(out.text(), err.text(), exit_code, timed_out, truncated, note)

    def _reports(self) -> list[dict]:
        *lines, self._pending = self._pending.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def _death(self, report: dict, exit_code: int | None) -> tuple[int | None, str]:
        """Turn the reaper's report on the cell runner's end into an exit code and an explanation."""
        if report.get("died") == "signal":
            sig = report["signal"]
            reasons = {
                signal.SIGXCPU: f"CPU-time limit of {self.limits.cpu_s} s exceeded",
                signal.SIGKILL: "killed (CPU or memory limit)",
                signal.SIGXFSZ: f"file-size limit of {self.limits.file_size_mb} MiB exceeded",
            }
            return -sig, reasons.get(sig, f"killed by {signal.Signals(sig).name}")
        code = report.get("exit_code", 0)
        if exit_code is not None and code == 0:
            return exit_code, ""  # the runner finished its cells and left normally
        return code, f"the sandbox process exited with code {code}" + (
            "; the session state was lost" if self.persistent else ""
        )

    def _drain(self, sel: selectors.BaseSelector) -> None:
        """Read what the cell already wrote (it flushed before reporting) without waiting for more."""
        while True:
            ready = [k for k, _ in sel.select(timeout=0) if k.data is not None]
            if not ready:
                return
            for key in ready:
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                else:
                    key.data.add(data)
