"""Runs inside the sandbox (as a script, standard library only): sets the sandbox up, then runs cells.

Process layout: this script starts as the first process of the sandbox (PID 1 of its PID namespace
when there is one). It masks the shared temporary folders, then forks: the parent stays a reaper that
never runs user code (PID 1 ignores signals such as SIGXCPU, and must collect orphans), the child drops
privileges, applies the resource limits and runs each cell it reads from the request pipe. When the
child dies the reaper reports how and exits, which makes the kernel kill every process left in the
namespace.
"""

import ast
import ctypes
import json
import os
import resource
import sys
import traceback

MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384


def _mount(libc, source, target, fstype, flags, data):
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def mask_folders(masks, keep, size_mb):
    """Cover shared temporary folders and home folders with private empty ones (so writes there never
    reach the host and secrets there stay unseen), then re-bind the paths the sandbox needs from them
    (its workspace, the Python installation), reachable through fresh world-traversable parents."""
    libc = ctypes.CDLL(None, use_errno=True)
    held = []
    for path in sorted(keep):  # parents first; a path inside one already kept comes along with it
        if any(path.startswith(h.rstrip("/") + "/") for h, _, _ in held):
            continue
        if any(path == m or path.startswith(m.rstrip("/") + "/") for m, _ in masks) and os.path.exists(path):
            held.append((path, os.open(path, os.O_PATH), os.path.isdir(path)))
    for m, mode in masks:
        _mount(libc, "tmpfs", m, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode={mode}".encode())
    for path, fd, is_dir in held:
        if is_dir:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
        os.close(fd)


def set_limits(cfg):
    mb = 1024 * 1024
    limits = [
        (resource.RLIMIT_CPU, cfg["cpu_s"], cfg["session_cpu_s"]),
        (resource.RLIMIT_AS, cfg["memory_mb"] * mb, cfg["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, cfg["file_size_mb"] * mb, cfg["file_size_mb"] * mb),
        (resource.RLIMIT_NPROC, cfg["max_processes"], cfg["max_processes"]),
        (resource.RLIMIT_NOFILE, cfg["max_open_files"], cfg["max_open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))


PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_privileges(uid, gid):
    """As host root: become ``uid``/``gid``. In a user namespace (not root on the host) the code is root of
    that namespace: drop every capability, also from the bounding set so that an exec cannot regain them,
    so it cannot undo the masks or the mounts. Either way, setuid programs can never raise privileges."""
    libc = ctypes.CDLL(None, use_errno=True)
    if uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise RuntimeError("could not drop privileges")
    else:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        for cap in range(last + 1):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"cannot drop capability {cap} from the bounding set")
        header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # version 3: all sets empty
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot set no_new_privs")


def run_cell(code, namespace):
    """Execute one cell like a notebook: the value of a final expression is printed."""
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        if last is not None:
            tree.body.pop()
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
            if value is not None:
                print(repr(value))
        return 0
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:
        etype, value, tb = sys.exc_info()
        traceback.print_exception(etype, value, tb.tb_next if tb else None)
        return 1


def serve_cells(cfg, requests, responses):
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    cpu_step = cfg["cpu_s"]
    for line in requests:
        request = json.loads(line)
        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = int(used.ru_utime + used.ru_stime) + 1
        resource.setrlimit(
            resource.RLIMIT_CPU, (min(spent + cpu_step, cfg["session_cpu_s"]), cfg["session_cpu_s"])
        )
        status = run_cell(request["code"], namespace)
        sys.stdout.flush()
        sys.stderr.flush()
        responses.write(json.dumps({"exit_code": status}) + "\n")
        responses.flush()


def main():
    cfg = json.loads(sys.argv[1])
    if cfg["masks"]:
        mask_folders(cfg["masks"], cfg["keep"], cfg["tmp_size_mb"])
    os.chdir(cfg["workspace"])
    child = os.fork()
    if child == 0:
        try:
            drop_privileges(cfg["uid"], cfg["gid"])
            set_limits(cfg)
            sys.stdout.reconfigure(line_buffering=True)
            requests = os.fdopen(cfg["request_fd"], "r", encoding="utf-8")
            responses = os.fdopen(cfg["response_fd"], "w", encoding="utf-8")
            serve_cells(cfg, requests, responses)
        except BaseException:
            traceback.print_exc()
            os._exit(70)
        os._exit(0)
    os.close(cfg["request_fd"])
    while True:  # reap every process; report on the cell runner, then exit (killing the namespace)
        pid, status = os.wait()
        if pid == child:
            break
    responses = os.fdopen(cfg["response_fd"], "w", encoding="utf-8")
    if os.WIFSIGNALED(status):
        report = {"died": "signal", "signal": os.WTERMSIG(status)}
    else:
        report = {"died": "exit", "exit_code": os.WEXITSTATUS(status)}
    responses.write(json.dumps(report) + "\n")
    responses.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
