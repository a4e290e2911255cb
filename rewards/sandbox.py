"""Run untrusted (model-generated) Python in a subprocess with time, memory, file, process and network limits.

Layers, outermost first:
  * a fresh temporary working directory, removed afterwards; a minimal environment; `python -I -S`
  * a new session (process group), killed as a whole at the wall-time limit
  * rlimits: CPU seconds, address space, file size, number of processes, open files, no core dumps
  * when started as root and the interpreter is reachable by `nobody`: the child drops to user / group `nobody` (so
    it cannot signal or read root's processes and files, and the process limit counts only sandboxed processes);
    `privileges_dropped()` says whether this happens here (not where Python lives under /root, as on our CI)
  * a private network namespace (no interfaces but a down loopback) when the kernel allows `unshare`
  * inside the interpreter, before the untrusted code: an audit hook (PEP 578) that refuses sockets, process
    creation, signals, `ctypes`, and any file access outside the working directory and the standard library

`run_python` never raises for what the code does; the result says how it ended.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time

NOBODY = 65534
CLONE_NEWNET = 0x40000000

_GUARD = textwrap.dedent('''
    import os, sys
    _root = os.path.realpath(os.getcwd())
    _read_ok = tuple(os.path.realpath(p) for p in {read_ok!r}) + (_root,)
    _blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.", "pty.", "os.chroot",
                "os.setuid", "os.setgid", "resource.setrlimit", "sys.addaudithook", "mmap.")
    _writes = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
               "os.truncate", "os.utime", "shutil.")
    _reads = ("os.listdir", "os.scandir")
    def _inside(path, roots):
        try:
            real = os.path.realpath(os.fsdecode(path)) if not isinstance(path, int) else None
        except Exception:
            return False
        return real is None or any(real == r or real.startswith(r + os.sep) for r in roots)
    def _hook(event, args):
        if event.startswith(_blocked):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "import" and args[0] in ("ctypes", "_ctypes", "_posixsubprocess", "_socket", "socket"):
            raise PermissionError("sandbox: import of " + args[0] + " is not allowed")
        if event == "open":
            path, mode = args[0], args[1] or "r"
            writing = any(c in str(mode) for c in "wax+")
            if not _inside(path, (_root,) if writing else _read_ok):
                raise PermissionError("sandbox: open(" + repr(path) + ") is outside the sandbox")
        if event.startswith(_writes) and args and not _inside(args[0], (_root,)):
            raise PermissionError("sandbox: " + event + " outside the sandbox")
        if event.startswith(_reads) and args and not _inside(args[0] or ".", _read_ok):
            raise PermissionError("sandbox: " + event + " outside the sandbox")
    sys.addaudithook(_hook)
    del _hook
    import runpy
    sys.argv = ["main.py"]
    runpy.run_path("main.py", run_name="__main__")
''')


@dataclasses.dataclass
class SandboxLimits:
    wall_s: float = 10.0        # wall-clock limit (the process group is killed)
    cpu_s: int = 5              # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 512        # address space (RLIMIT_AS)
    file_mb: int = 16           # largest file it may write (RLIMIT_FSIZE)
    processes: int = 32         # RLIMIT_NPROC (per sandbox user)
    open_files: int = 64        # RLIMIT_NOFILE
    output_kb: int = 256        # stdout / stderr kept


@dataclasses.dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _unshare_network() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(CLONE_NEWNET)  # fails quietly without the privilege; the audit hook still refuses sockets
    except Exception:
        pass


def _child_setup(limits: SandboxLimits, drop_to_nobody: bool):
    def setup() -> None:
        os.setsid()
        _unshare_network()
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if drop_to_nobody:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))

    return setup


_NOBODY_OK: bool | None = None


def privileges_dropped() -> bool:
    """Whether sandboxed code runs as `nobody`: we are root and `nobody` can execute this interpreter."""
    global _NOBODY_OK
    if _NOBODY_OK is None:
        _NOBODY_OK = False
        if os.geteuid() == 0:
            def drop() -> None:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            try:
                _NOBODY_OK = subprocess.run([sys.executable, "-I", "-S", "-c", "import os"], preexec_fn=drop,
                                            capture_output=True, timeout=30, cwd="/").returncode == 0
            except (OSError, subprocess.SubprocessError):
                _NOBODY_OK = False
    return _NOBODY_OK


def _stdlib_paths() -> list[str]:
    paths = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
    return sorted(p for p in paths if p)


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a script in the sandbox; returns its exit status, output and whether it timed out."""
    limits = limits or SandboxLimits()
    workdir = tempfile.mkdtemp(prefix="align-sandbox-")
    drop = privileges_dropped()
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(workdir, "guard.py"), "w", encoding="utf-8") as f:
            f.write(_GUARD.format(read_ok=_stdlib_paths()))
        if drop:
            os.chmod(workdir, 0o777)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "guard.py"], cwd=workdir, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_child_setup(limits, drop), close_fds=True)
        timed_out = False
        try:
            out, err = proc.communicate(stdin.encode(), timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, err = proc.communicate()
        _kill_group(proc.pid)  # anything it left behind in its session
        keep = limits.output_kb * 1024
        return SandboxResult(proc.returncode, out[:keep].decode(errors="replace"),
                             err[-keep:].decode(errors="replace"), timed_out, time.monotonic() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
