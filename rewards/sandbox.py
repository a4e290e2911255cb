"""Run untrusted (model-generated) Python with the operating system as the boundary.

Threat model. In GRPO the policy is optimised against whatever scores it, so a completion is hostile code that
knows Python well: it can walk frames and `gc` to anything in its interpreter, patch builtins, switch off an audit
hook, load `ctypes`, fork, `setsid`, signal, and write wherever its process may. Nothing inside the interpreter
holds against that, so the boundary is the kernel's:

  * namespaces (made by a small trusted launcher, `_LAUNCHER`, before the untrusted interpreter starts):
      - mount: a new root holding only /usr (and the merged /bin, /lib, /lib64 links), the interpreter's own prefix
        and /etc/ld.so.cache, all read-only; /dev/null, /dev/zero, /dev/urandom; a small /tmp; and the program's
        own directory /work, the only writable place. No home directories, no datasets, no checkpoints, no
        site-packages of the training environment;
      - PID: the program is process 1 of its namespace, so when it ends or is killed every process it started dies
        with it (a `setsid()` child included); it sees and can signal nothing outside;
      - network (a loopback that is down), IPC, UTS;
  * an unprivileged user: started as root, the program runs as uid / gid 65534 (`nobody`) with no supplementary
    groups; started as another user, inside a nested user namespace mapped to that user, with no capabilities;
  * `no_new_privs`; rlimits on CPU seconds, address space, file size, processes (they bind: the uid is not root),
    open files, no core dumps; a wall-clock limit at which the launcher's session is killed, and with it (parent-death
    signal) the namespace.

The audit hook of earlier versions stays as a second layer (`guard=True`): it refuses sockets, process creation,
signals, `ctypes` and file access outside the program's directory. The tests run every attack with it off.

Where the kernel refuses namespaces (some containers), `run_python` raises `SandboxUnavailable`; `isolation="none"`
is the explicit way to run anyway (rlimits, session kill and the hook only: for code you trust).

`run_python` never raises for what the code does; the result says how it ended. `SandboxProcess` is the same
sandbox kept open with pipes to its stdin / stdout (the code reward's judge talks to the program through them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time

NOBODY = 65534
SETUP_FAILED = 125  # the launcher's exit status when the kernel refuses the isolation

# The trusted launcher: runs as the caller, makes the namespaces and the new root, drops to the unprivileged user
# and only then executes the untrusted interpreter. Its configuration comes as one JSON argument.
_LAUNCHER = textwrap.dedent(r'''
    import ctypes, json, os, resource, signal, sys
    cfg = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
    RDONLY, NOSUID, NODEV, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
    PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

    def fail(what):
        err = ctypes.get_errno()
        sys.stderr.write("sandbox setup: %s: %s\n" % (what, os.strerror(err)))
        os._exit(125)

    def call(ret, what):
        if ret != 0:
            fail(what)

    def write(path, text):
        with open(path, "w") as f:
            f.write(text)

    def map_user(inside, outside_uid, outside_gid):
        write("/proc/self/setgroups", "deny")
        write("/proc/self/uid_map", "%d %d 1" % (inside, outside_uid))
        write("/proc/self/gid_map", "%d %d 1" % (inside, outside_gid))

    def mount(src, dst, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        call(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount %s on %s" % (src, dst))

    uid, gid = os.geteuid(), os.getegid()
    namespaces = NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS
    if cfg["userns"]:
        call(libc.unshare(NEWUSER | namespaces), "unshare (user namespace)")
        map_user(0, uid, gid)
    else:
        call(libc.unshare(namespaces), "unshare")
    pid = os.fork()
    if pid:  # the launcher waits for process 1 of the namespace and reports how it ended
        signal.signal(signal.SIGTERM, lambda *a: os._exit(143))
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()  # its own session inside the namespace: kill(0, ...) reaches nothing outside
    root = cfg["root"]
    mount(None, "/", None, REC | PRIVATE)
    mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
    for name, target in cfg["links"]:
        os.symlink(target, root + name)
    for src, dst, writable in cfg["binds"]:
        path = root + dst
        if os.path.isdir(src):
            os.makedirs(path, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            open(path, "w").close()
        mount(src, path, None, BIND | REC)
        mount(None, path, None, REMOUNT | BIND | NOSUID | (0 if writable else RDONLY) | (0 if src.startswith("/dev/") else NODEV))
    os.makedirs(root + "/tmp", mode=0o755)
    mount("tmpfs", root + "/tmp", "tmpfs", NOSUID | NODEV, "size=%dk,mode=1777" % cfg["tmp_kb"])
    mount(None, root, None, REMOUNT | RDONLY | NOSUID | NODEV)
    os.chdir(root)
    os.chroot(".")
    os.chdir("/work")
    lim = cfg["limits"]
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_mb"] * mb, lim["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_mb"] * mb, lim["file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["open_files"], lim["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if cfg["userns"]:  # a nested user namespace where the caller is 65534 and holds no capability after exec
        call(libc.unshare(NEWUSER), "unshare (nested user namespace)")
        map_user(65534, 0, 0)
    else:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"], lim["processes"]))
    call(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a change of credentials clears it
    os.execve(cfg["exe"], [cfg["exe"], "-I", "-S"] + cfg["argv"], cfg["env"])
''')

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
            path, mode, flags = args[0], args[1], args[2]
            writing = (any(c in str(mode) for c in "wax+") if mode is not None
                       else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)))
            if not _inside(path, (_root,) if writing else _read_ok):
                raise PermissionError("sandbox: open(" + repr(path) + ") is outside the sandbox")
        if event.startswith(_writes) and args and not _inside(args[0], (_root,)):
            raise PermissionError("sandbox: " + event + " outside the sandbox")
        if event.startswith(_reads) and args and not _inside(args[0] or ".", _read_ok):
            raise PermissionError("sandbox: " + event + " outside the sandbox")
    sys.addaudithook(_hook)
    del _hook
    import runpy
    sys.argv = [{script!r}]
    runpy.run_path({script!r}, run_name="__main__")
''')


class SandboxUnavailable(RuntimeError):
    """The kernel refuses the namespaces the sandbox needs."""


@dataclasses.dataclass
class SandboxLimits:
    wall_s: float = 10.0        # wall-clock limit (the launcher's session, and with it the namespace, is killed)
    cpu_s: int = 5              # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 512        # address space (RLIMIT_AS)
    file_mb: int = 16           # largest file it may write (RLIMIT_FSIZE); /tmp holds as much
    processes: int = 32         # RLIMIT_NPROC (of the sandbox user)
    open_files: int = 64        # RLIMIT_NOFILE
    output_kb: int = 256        # stdout / stderr kept by run_python (all of it is read)


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


ISOLATIONS = ("os", "none")


def _interpreter() -> tuple[str, list[tuple[str, str, bool]], list[tuple[str, str]]]:
    """The real interpreter binary, the read-only binds and the /bin-style links the new root needs."""
    exe = os.path.realpath(sys.executable)
    binds = [("/usr", "/usr", False)]
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}:
        if not (prefix == "/usr" or prefix.startswith("/usr/")):
            binds.append((prefix, prefix, False))
    if not exe.startswith("/usr/") and not any(exe.startswith(b[0] + "/") for b in binds[1:]):
        binds.append((os.path.dirname(exe), os.path.dirname(exe), False))
    for f in ("/etc/ld.so.cache", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"):
        if os.path.exists(f):
            binds.append((f, f, f.startswith("/dev/")))
    links = []
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            links.append((name, os.readlink(name)))
        elif os.path.isdir(name):
            binds.append((name, name, False))
    return exe, binds, links


class SandboxProcess:
    """`script` (a file in `files`) running in the sandbox, with pipes to its stdin / stdout; stderr is collected.

    Use as a context manager; leaving it kills whatever is left and removes the directory."""

    def __init__(self, files: dict[str, str], script: str, limits: SandboxLimits, isolation: str = "os",
                 guard: bool = False):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.limits, self.isolation = limits, isolation
        self.base = tempfile.mkdtemp(prefix="align-sandbox-")
        work = os.path.join(self.base, "work")
        os.mkdir(work)
        for name, text in files.items():
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                f.write(text)
        argv = [script]
        if guard:
            with open(os.path.join(work, "guard.py"), "w", encoding="utf-8") as f:
                read_ok = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]})
                f.write(_GUARD.format(read_ok=read_ok, script=script))
            argv = ["guard.py"]
        env = {"PATH": "/usr/bin:/bin", "HOME": "/work", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        self.start = time.monotonic()
        if isolation == "none":
            cmd, cwd = [sys.executable, "-I", "-S", *argv], work
            preexec = _rlimits(limits)
        else:
            exe, binds, links = _interpreter()
            root = os.path.join(self.base, "root")
            os.mkdir(root)
            userns = os.geteuid() != 0
            if not userns:
                os.chown(work, NOBODY, NOBODY)
                for name in files:
                    os.chown(os.path.join(work, name), NOBODY, NOBODY)
            cfg = dict(root=root, binds=[*binds, (work, "/work", True)], links=links, exe=exe, argv=argv, env=env,
                       userns=userns, tmp_kb=limits.file_mb * 1024, limits=dataclasses.asdict(limits))
            cmd, cwd, preexec = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)], "/", None
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec,
                                     close_fds=True)

    def remaining(self) -> float:
        return self.limits.wall_s - (time.monotonic() - self.start)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher's session; the namespace dies with process 1
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        self.kill()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        self.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rlimits(limits: SandboxLimits):
    def setup() -> None:
        import resource

        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return setup


def read_all(proc: subprocess.Popen, keep: int, deadline: float) -> tuple[bytes, bytes, bool]:
    """Read stdout and stderr to their ends (keeping the first / last `keep` bytes) until `deadline`
    (time.monotonic()); returns them and whether the deadline passed first."""
    out, err = bytearray(), bytearray()
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    while streams:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), bytes(err), True
        ready, _, _ = select.select(list(streams), [], [], left)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                del streams[fd]
                continue
            buf = streams[fd]
            buf += chunk
            if len(buf) > 2 * keep:  # stdout keeps its head, stderr its tail
                if buf is out:
                    del buf[keep:]
                else:
                    del buf[:-keep]
    return bytes(out[:keep]), bytes(err[-keep:]), False


def _setup_error(returncode: int | None, stderr: str) -> str | None:
    if returncode == SETUP_FAILED and "sandbox setup:" in stderr:
        return stderr.strip().splitlines()[-1]
    return None


def unavailable_message(detail: str) -> str:
    return (f"the code sandbox cannot isolate programs on this machine ({detail}): it needs Linux namespaces "
            "(run as root, or with unprivileged user namespaces enabled). To run model-generated code without OS "
            "isolation anyway, only for code you trust, set the reward's `isolation: none`.")


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None, isolation: str = "os",
               guard: bool = False) -> SandboxResult:
    """Run `code` as a script in the sandbox; returns its exit status, output and whether it timed out."""
    limits = limits or SandboxLimits()
    with SandboxProcess({"main.py": code}, "main.py", limits, isolation, guard) as box:
        try:
            box.proc.stdin.write(stdin.encode())
            box.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        out, err, timed_out = read_all(box.proc, limits.output_kb * 1024, box.start + limits.wall_s)
        box.kill()
        returncode = box.proc.wait()
        seconds = time.monotonic() - box.start
    stderr = err.decode(errors="replace")
    problem = _setup_error(returncode, stderr)
    if problem:
        raise SandboxUnavailable(unavailable_message(problem))
    return SandboxResult(None if timed_out else returncode, out.decode(errors="replace"), stderr, timed_out, seconds)


_AVAILABLE: dict[str, str | None] = {}


def isolation_problem(isolation: str = "os") -> str | None:
    """None when the sandbox works here with `isolation`, else why not (checked once per process)."""
    if isolation == "none":
        return None
    if isolation not in _AVAILABLE:
        try:
            r = run_python("print('ok')", limits=SandboxLimits(wall_s=30), isolation=isolation)
            _AVAILABLE[isolation] = None if r.ok and r.stdout.strip() == "ok" else (
                f"a trivial program failed: exit {r.returncode}, {r.stderr.strip()[-300:]}")
        except SandboxUnavailable as e:
            _AVAILABLE[isolation] = str(e)
    return _AVAILABLE[isolation]
