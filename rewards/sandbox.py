"""Run untrusted (model-generated) Python with the operating system as the boundary: one sandbox, one boundary.

Threat model. In GRPO the policy is optimised against whatever scores it, so a completion is hostile code that
knows Python well: it can walk frames and `gc` to anything in its interpreter, patch builtins, switch off an audit
hook, load `ctypes`, make raw system calls, fork, `setsid`, signal, and write wherever its process may. Nothing
inside the interpreter holds against that, so the boundary is the kernel's, and it is drawn around each sandbox:
what one sandbox does must not reach the host, and must not reach another sandbox (six copies of one completion in
a reward call must score alike).

  * namespaces (made by a small trusted launcher, `_LAUNCHER`, before the untrusted interpreter starts):
      - mount: a new root holding only /usr (and the merged /bin, /lib, /lib64 links), the interpreter's own prefix
        and /etc/ld.so.cache, all read-only; /dev/null, /dev/zero, /dev/urandom; and two tmpfs of the sandbox's own,
        /tmp and /work (its files copied in; the only writable places), bounded in size (`disk_mb`, `file_mb`) and
        in files (`disk_files`). No /proc, no home directories, no datasets, no checkpoints, no site-packages of the
        training environment; on the host side only an empty mount-point directory exists;
      - PID: the program is process 1 of its namespace, so when it ends or is killed every process it started dies
        with it (a `setsid()` child included); it sees and can signal nothing outside;
      - network (a loopback that is down), IPC, UTS;
      - user: the program is uid / gid 65534 with no capabilities in a user namespace of its own, so kernel state
        keyed on the user (keyrings, RLIMIT_NPROC counts, inotify and locked-memory accounting) is per sandbox.
        Started as root, that namespace maps 65534 to an id no other sandbox has (`SANDBOX_UID_BASE` + the
        launcher's pid); started as another user, to that user (nested below a namespace that made the mounts);
  * whole-sandbox bounds (cgroups: v2 where this process's cgroup can hold a child with the controller, else the
    v1 hierarchies): memory (`memory_mb`: every page the sandbox holds, memfd and tmpfs included; over it the
    kernel's OOM killer acts inside the sandbox, not on the trainer), processes (`processes`), CPU time
    (`cpu_s`: the launcher reads the cgroup's usage every 50 ms and kills the namespace past it, exit status
    `CPU_EXCEEDED`) and CPUs at once (`cpus`);
  * a seccomp filter (compiled by libseccomp through `pyseccomp`, once per host process; the launcher installs that
    program right before it executes the interpreter) refusing with EPERM what reaches state or memory outside those bounds: `SECCOMP_REFUSED` (keyrings,
    memfd_create, io_uring, userfaultfd, perf_event_open); another architecture's system calls kill the caller;
  * `no_new_privs`; rlimits per process on CPU seconds, address space, file size, processes, open files, no core
    dumps; a wall-clock limit at which the launcher's session is killed, and with it the namespace;
  * the sandbox dies with its host: the launcher has a parent-death signal (SIGKILL) on the thread that started it,
    process 1 one on the launcher, and the namespace dies with process 1.

Where this machine lacks a part, the first `isolation_problem()` (the code reward calls it when built) warns once,
naming it (`unbounded()`), and the sandbox runs without it: without a memory cgroup, memory is bounded only per
process (RLIMIT_AS, `memory_mb` each: forks multiply it) and in files by the two tmpfs sizes; without a pids cgroup,
processes only by RLIMIT_NPROC of the sandbox's own uid; without a CPU-usage cgroup, CPU time only per process (n
children use n x `cpu_s`, until the wall clock); without pyseccomp / libseccomp the calls above are allowed, and
memfd files escape both the address-space limit and the tmpfs sizes (up to `open_files` x `file_mb`) unless a memory
cgroup holds them (keyrings stay per user namespace).

The audit hook of earlier versions stays as a second layer (`guard=True`): it refuses sockets, process creation,
signals, `ctypes` and file access outside the program's directory. The tests run every attack with it off.

Where the kernel refuses namespaces (some containers), `run_python` raises `SandboxUnavailable`; `isolation="none"`
is the explicit way to run anyway (rlimits, session kill and the hook only, in a host directory: for code you trust).

`run_python` never raises for what the code does, cleanup included; the result says how it ended, and the whole
sandbox's CPU time and memory peak where measured. `SandboxProcess` is the same sandbox kept open with pipes to its
stdin / stdout (the code reward's judge talks to the program through them).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import itertools
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
import threading
import time
import warnings

NOBODY = 65534
SETUP_FAILED = 125  # the launcher's exit status when the kernel refuses the isolation
CPU_EXCEEDED = 152  # the launcher's exit status when the whole sandbox used its CPU seconds (128 + SIGXCPU)
# Started as root, sandbox n runs as uid / gid SANDBOX_UID_BASE + (its launcher's pid) outside its user namespace:
# an id of its own that no account and no other live sandbox has (pids are at most 2**22).
SANDBOX_UID_BASE = 1 << 30
# Refused by the seccomp filter (EPERM): kernel state shared beyond the sandbox (keyrings), memory outside the
# address-space limit (memfd), and interfaces that bypass the other checks or widen the kernel's attack surface.
SECCOMP_REFUSED = ("keyctl", "add_key", "request_key", "memfd_create", "io_uring_setup", "io_uring_enter",
                   "io_uring_register", "userfaultfd", "perf_event_open")

# The trusted launcher: runs as the caller, puts the sandbox in its cgroups, makes the namespaces, the new root and
# the tmpfs /work, gives up its identity for a user namespace of the sandbox's own, loads the seccomp filter and only
# then executes the untrusted interpreter. Its configuration comes as JSON in an unlinked file (fd in argv[1]).
_LAUNCHER = textwrap.dedent(r"""
    import ctypes, json, os, resource, select, signal, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER = 1, 4, 22, 38, 2
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the host (the thread that started it)
    with os.fdopen(int(sys.argv[1]), "rb") as f:
        cfg = json.loads(f.read())
    if os.getppid() != cfg["host"]:  # the host died before the line above
        os._exit(137)
    NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
    RDONLY, NOSUID, NODEV, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18

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

    if cfg["seccomp"]:  # libseccomp's program for the filter (compiled once by the host), installed before exec
        bpf = bytes.fromhex(cfg["seccomp"])
        code = ctypes.create_string_buffer(bpf, len(bpf))
        class FProg(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        fprog = FProg(len(bpf) // 8, ctypes.addressof(code))
    usage = cfg["cpu_usage"] and os.open(cfg["cpu_usage"][0], os.O_RDONLY)  # whole-sandbox CPU time
    uid, gid = os.geteuid(), os.getegid()
    outside = cfg["uid_base"] + os.getpid() if uid == 0 else None  # the sandbox's own id, root only
    namespaces = NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS
    if uid != 0:
        call(libc.unshare(NEWUSER | namespaces), "unshare (user namespace)")
        map_user(0, uid, gid)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        call(libc.unshare(namespaces), "unshare")
    if os.getppid() != cfg["host"]:
        os._exit(137)
    pid = os.fork()
    if pid:  # the launcher waits for process 1 of the namespace, bounds its CPU time, and reports how it ended
        signal.signal(signal.SIGTERM, lambda *a: os._exit(143))
        limit = cfg["limits"]["cpu_s"]
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if usage:  # cgroup v1 cpuacct.usage (ns), v2 cpu.stat's usage_usec
                text = os.pread(usage, 4096, 0).decode()
                used = float(text.split("usage_usec")[1].split()[0] if "usage_usec" in text else text)
                used /= cfg["cpu_usage"][1]
            if usage and used > limit:
                os.kill(pid, signal.SIGKILL)  # process 1: the kernel ends the whole namespace
                os.waitpid(pid, 0)
                sys.stderr.write("sandbox: the CPU time of the whole sandbox passed %s s\n" % limit)
                os._exit(152)
            if pidfd is None:
                time.sleep(0.05)
            else:
                select.select([pidfd], [], [], 0.05)
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()  # its own session inside the namespace: kill(0, ...) reaches nothing outside
    for path in cfg["cgroups"]:  # process 1 and all it starts: memory, pids, CPU bound as one
        try:
            write(path, "0")
        except OSError as e:
            sys.stderr.write("sandbox setup: join cgroup %s: %s\n" % (path, e.strerror))
            os._exit(125)
    owner = outside if uid == 0 else 0  # who the program is, in this namespace's ids
    root = cfg["root"]
    mount(None, "/", None, REC | PRIVATE)
    mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=1m,nr_inodes=256,mode=755")
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
    lim = cfg["limits"]
    files = cfg["files"]
    files = {name: text.encode() for name, text in files.items()}
    for d, kb in (("/work", lim["disk_mb"] * 1024 + sum(len(t) for t in files.values()) // 1024 + 64),
                  ("/tmp", lim["file_mb"] * 1024)):
        os.makedirs(root + d, mode=0o755)
        mount("tmpfs", root + d, "tmpfs", NOSUID | NODEV, "size=%dk,nr_inodes=%d,mode=%s,uid=%d,gid=%d"
              % (kb, lim["disk_files"] + len(files) + 1, "755" if d == "/work" else "1777", owner, owner))
    for name, text in files.items():
        fd = os.open(root + "/work/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, text)
        os.fchown(fd, owner, owner)
        os.close(fd)
    mount(None, root, None, REMOUNT | RDONLY | NOSUID | NODEV)
    os.chdir(root)
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_mb"] * mb, lim["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_mb"] * mb, lim["file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["open_files"], lim["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if uid == 0:  # the sandbox's own unprivileged id, then a user namespace where it is 65534
        os.setgroups([])
        os.setresgid(outside, outside, outside)
        os.setresuid(outside, outside, outside)
        libc.prctl(PR_SET_DUMPABLE, 1)  # a change of uid makes /proc/self root's; the maps below need it ours
        call(libc.unshare(NEWUSER), "unshare (user namespace)")
        map_user(65534, outside, outside)
    else:  # a nested user namespace where the caller is 65534 and holds no capability after exec
        call(libc.unshare(NEWUSER), "unshare (nested user namespace)")
        map_user(65534, 0, 0)
    os.chroot(".")  # (a chrooted process cannot make a user namespace: the program cannot regain capabilities)
    os.chdir("/work")
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"], lim["processes"]))
    call(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a change of credentials clears it
    if cfg["seccomp"]:
        call(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp filter")
    os.execve(cfg["exe"], [cfg["exe"], "-I", "-S"] + cfg["argv"], cfg["env"])
""")

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
    cpu_s: int = 5              # CPU seconds of the whole sandbox (cgroup, checked every 50 ms) and of each process
    memory_mb: int = 512        # memory of the whole sandbox (cgroup: memfd, tmpfs, forks) and address space per process
    file_mb: int = 16           # largest file it may write (RLIMIT_FSIZE); /tmp holds as much
    processes: int = 32         # processes of the whole sandbox (pids cgroup; RLIMIT_NPROC of its own uid)
    open_files: int = 64        # RLIMIT_NOFILE
    output_kb: int = 256        # stdout / stderr kept by run_python (all of it is read)
    disk_mb: int = 64           # what the program may add to its /work (a tmpfs; the files given come on top)
    disk_files: int = 4096      # files and directories it may make in /work (and in /tmp)
    cpus: float = 1.0           # CPUs the whole sandbox may use at once (cgroup CPU quota)


@dataclasses.dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    cpu_s: float | None = None           # CPU seconds of the whole sandbox (None where no cgroup measures it)
    memory_peak_mb: float | None = None  # its memory peak, memfd and tmpfs included (None where not measured)

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


# ---- whole-sandbox bounds: cgroups (v2 where it holds the controller and a child can be made, else v1) ----

_WANTED = ("memory", "pids", "cpu", "cpuacct")  # cpuacct: CPU time used (v2: cpu.stat, in every cgroup)


@functools.lru_cache(maxsize=1)
def _cgroup_parents() -> dict[str, tuple[str, int]]:
    """resource -> (this process's cgroup directory that bounds it for children, cgroup version), for each resource
    where a child cgroup can be made here (found once per process)."""
    v1_mounts, v2_mount = {}, None
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:4] for line in f]
        with open("/proc/self/cgroup") as f:
            own = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return {}
    for mnt, fstype, opts in mounts:
        if fstype == "cgroup2":
            v2_mount = mnt
        elif fstype == "cgroup":
            for o in opts.split(","):
                if o in _WANTED:
                    v1_mounts[o] = mnt
    found: dict[str, tuple[str, int]] = {}
    candidates = []
    for _, ctrls, path in own:
        if ctrls == "" and v2_mount:
            d = v2_mount + path.rstrip("/")
            try:
                with open(d + "/cgroup.controllers") as f:
                    available = set(f.read().split())
                with open(d + "/cgroup.subtree_control") as f:
                    enabled = set(f.read().split())
            except OSError:
                continue
            for c in ("memory", "pids", "cpu"):
                if c in available and c not in enabled:
                    try:  # refused when this cgroup holds processes and is not the root: then v1 or nothing
                        with open(d + "/cgroup.subtree_control", "w") as f:
                            f.write("+" + c)
                        enabled.add(c)
                    except OSError:
                        pass
            candidates.insert(0, (d, 2, (enabled & {"memory", "pids", "cpu"}) | {"cpuacct"}))
        else:
            names = set(ctrls.split(",")) & set(_WANTED)
            if names and all(n in v1_mounts for n in names):
                candidates.append((v1_mounts[next(iter(names))] + path.rstrip("/"), 1, names))
    for d, version, provides in candidates:
        if all(r in found for r in provides):
            continue
        probe = f"{d}/align-probe-{os.getpid()}"
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError:
            continue
        for r in provides:
            found.setdefault(r, (d, version))
        _remove_stale(d)
    return found


def _remove_stale(parent: str) -> None:
    """Empty sandbox cgroups left by hosts that were killed (named align-sandbox-<host pid>-<n>)."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith("align-sandbox-")]
    except OSError:
        return
    for n in names:
        pid = n.split("-")[2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.rmdir(f"{parent}/{n}")
            except OSError:
                pass


_BOUND_BY = {"memory": "memory across the sandbox's processes (memfd, tmpfs, forks): only RLIMIT_AS per process",
             "pids": "processes across the sandbox: only RLIMIT_NPROC of its uid",
             "cpuacct": "CPU time across the sandbox's processes: only RLIMIT_CPU per process and the wall clock",
             "cpu": "CPUs the sandbox uses at once"}


def unbounded(isolation: str = "os") -> list[str]:
    """What the sandbox does not bound on this machine (empty where every part is there)."""
    if isolation == "none":
        return ["everything but rlimits: isolation is none"]
    parents = _cgroup_parents()
    missing = [f"{what} (no writable {r} cgroup)" for r, what in _BOUND_BY.items() if r not in parents]
    if _seccomp_config() is None:
        missing.append(f"the seccomp filter: {', '.join(SECCOMP_REFUSED)} are allowed ({_SECCOMP_PROBLEM[0]})")
    return missing


class _Cgroups:
    """The cgroups of one sandbox: made with their limits before it starts, removed (never raising) after."""

    _count = itertools.count()

    def __init__(self, limits: SandboxLimits):
        self.dirs: list[str] = []
        self.procs: list[str] = []
        self.cpu_usage: tuple[str, float] | None = None
        self.memory_peak: str | None = None
        parents = _cgroup_parents()
        name = f"align-sandbox-{os.getpid()}-{next(self._count)}"
        made: dict[str, str] = {}
        try:
            for r in _WANTED:
                if r not in parents:
                    continue
                parent, version = parents[r]
                d = made.get(parent)
                if d is None:
                    d = made[parent] = f"{parent}/{name}"
                    os.mkdir(d)
                    self.dirs.append(d)
                    self.procs.append(d + "/cgroup.procs")
                self._limit(r, d, version, limits)
        except OSError:
            self.remove()
            raise

    def _limit(self, r: str, d: str, version: int, limits: SandboxLimits) -> None:
        def put(file: str, value) -> None:
            with open(f"{d}/{file}", "w") as f:
                f.write(str(value))

        memory, quota = limits.memory_mb * 1024 * 1024, max(1000, int(limits.cpus * 100_000))
        if r == "memory" and version == 2:
            put("memory.max", memory)
            if os.path.exists(f"{d}/memory.swap.max"):
                put("memory.swap.max", 0)
            self.memory_peak = f"{d}/memory.peak"
        elif r == "memory":
            put("memory.limit_in_bytes", memory)
            if os.path.exists(f"{d}/memory.memsw.limit_in_bytes"):
                put("memory.memsw.limit_in_bytes", memory)  # no swapping out of the limit
            self.memory_peak = f"{d}/memory.max_usage_in_bytes"
        elif r == "pids":
            put("pids.max", limits.processes)
        elif r == "cpu" and version == 2:
            put("cpu.max", f"{quota} 100000")
        elif r == "cpu":
            put("cpu.cfs_period_us", 100_000)
            put("cpu.cfs_quota_us", quota)
        elif r == "cpuacct":
            self.cpu_usage = (f"{d}/cpu.stat", 1e6) if version == 2 else (f"{d}/cpuacct.usage", 1e9)

    def usage(self) -> tuple[float | None, float | None]:
        """(CPU seconds, memory peak MB) of the whole sandbox, where measured."""
        cpu = mem = None
        try:
            if self.cpu_usage:
                with open(self.cpu_usage[0]) as f:
                    text = f.read()
                cpu = float(text.split("usage_usec")[1].split()[0] if "usage_usec" in text else text)
                cpu /= self.cpu_usage[1]
            if self.memory_peak and os.path.exists(self.memory_peak):
                with open(self.memory_peak) as f:
                    mem = int(f.read()) / 2**20
        except (OSError, ValueError, IndexError):
            pass
        return cpu, mem

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(50):  # the last processes may still be leaving
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if os.path.exists(d + "/cgroup.kill"):
                        try:
                            with open(d + "/cgroup.kill", "w") as f:
                                f.write("1")
                        except OSError:
                            pass
                    time.sleep(0.02)
        self.dirs = []


# ---- the seccomp filter, through pyseccomp (ctypes over libseccomp) ----

_SECCOMP_PROBLEM: list[str] = [""]


@functools.lru_cache(maxsize=1)
def _seccomp_config() -> str | None:
    """The seccomp filter as libseccomp compiles it (BPF, hex), made once per process through pyseccomp; None (and
    why in _SECCOMP_PROBLEM) where pyseccomp or libseccomp is missing. The launcher installs it as it is."""
    try:
        import pyseccomp
    except ImportError as e:
        _SECCOMP_PROBLEM[0] = f"pyseccomp is not installed ({e})"
        return None
    except Exception as e:  # pyseccomp raises RuntimeError when libseccomp is absent
        _SECCOMP_PROBLEM[0] = f"libseccomp is not usable: {e}"
        return None
    try:
        f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        for name in SECCOMP_REFUSED:
            f.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            bpf = out.read()
    except (OSError, ValueError) as e:
        _SECCOMP_PROBLEM[0] = f"libseccomp refused the filter: {e}"
        return None
    return bpf.hex()


def _remove_tree(path: str) -> None:
    """Remove a directory the sandbox may have filled, never raising (deep trees included)."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        pass
    if os.path.lexists(path):
        try:  # rm walks any depth
            subprocess.run(["rm", "-rf", "--one-file-system", path], timeout=60, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            pass


class SandboxProcess:
    """`script` (a file in `files`) running in the sandbox, with pipes to its stdin / stdout; stderr is collected.

    Use as a context manager; leaving it kills whatever is left and removes its traces (never raising). The sandbox
    dies with the thread that made it (parent-death signal): use it from that thread."""

    def __init__(self, files: dict[str, str], script: str, limits: SandboxLimits, isolation: str = "os",
                 guard: bool = False):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.limits, self.isolation = limits, isolation
        self.cgroups: _Cgroups | None = None
        files = dict(files)
        argv = [script]
        if guard:
            read_ok = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]})
            files["guard.py"] = _GUARD.format(read_ok=read_ok, script=script)
            argv = ["guard.py"]
        env = {"PATH": "/usr/bin:/bin", "HOME": "/work", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        # the host side holds only an empty directory: the mount point of the sandbox's root (outside, /work is a
        # tmpfs in the sandbox's own mount namespace, gone with it); with isolation none, the program's directory
        self.base = tempfile.mkdtemp(prefix="align-sandbox-")
        try:
            if isolation == "none":
                for name, text in files.items():
                    with open(os.path.join(self.base, name), "w", encoding="utf-8") as f:
                        f.write(text)
                self.start = time.monotonic()
                self.proc = subprocess.Popen([sys.executable, "-I", "-S", *argv], cwd=self.base, env=env,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             start_new_session=True, preexec_fn=_rlimits(limits), close_fds=True)
                return
            exe, binds, links = _interpreter()
            self.cgroups = _Cgroups(limits)
            cfg = dict(root=self.base, binds=binds, links=links, exe=exe, argv=argv, env=env, files=files,
                       limits=dataclasses.asdict(limits), host=os.getpid(), uid_base=SANDBOX_UID_BASE,
                       cgroups=self.cgroups.procs, cpu_usage=self.cgroups.cpu_usage, seccomp=_seccomp_config())
            with tempfile.TemporaryFile() as conf:
                conf.write(json.dumps(cfg).encode())
                conf.seek(0)
                self.start = time.monotonic()
                self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(conf.fileno())],
                                             cwd="/", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                             pass_fds=(conf.fileno(),))
        except BaseException:
            if self.cgroups:
                self.cgroups.remove()
            _remove_tree(self.base)
            raise

    def remaining(self) -> float:
        return self.limits.wall_s - (time.monotonic() - self.start)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher's session; the namespace dies with process 1
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Kill what is left, then remove the cgroups and the host-side directory; never raises."""
        self.kill()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        self.proc.wait()
        self.usage = self.cgroups.usage() if self.cgroups else (None, None)
        if self.cgroups:
            self.cgroups.remove()
        _remove_tree(self.base)

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


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError, ValueError):  # the program exited or was killed
        pass


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None, isolation: str = "os",
               guard: bool = False) -> SandboxResult:
    """Run `code` as a script in the sandbox; returns its exit status, output and whether it timed out."""
    limits = limits or SandboxLimits()
    with SandboxProcess({"main.py": code}, "main.py", limits, isolation, guard) as box:
        # stdin from a thread: a program that never reads would block a write of more than the pipe holds (64 KB)
        # before the deadline is even watched; the kill below breaks the pipe and ends the writer
        threading.Thread(target=_feed, args=(box.proc.stdin, stdin.encode()), daemon=True).start()
        out, err, timed_out = read_all(box.proc, limits.output_kb * 1024, box.start + limits.wall_s)
        box.kill()
        returncode = box.proc.wait()
        seconds = time.monotonic() - box.start
    stderr = err.decode(errors="replace")
    problem = _setup_error(returncode, stderr)
    if problem:
        raise SandboxUnavailable(unavailable_message(problem))
    return SandboxResult(None if timed_out else returncode, out.decode(errors="replace"), stderr, timed_out, seconds,
                         *box.usage)


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
        if _AVAILABLE[isolation] is None and unbounded(isolation):
            warnings.warn("align: the code sandbox does not bound on this machine: " + "; ".join(unbounded(isolation))
                          + ". See rewards/sandbox.py's docstring for what is then shared.", RuntimeWarning,
                          stacklevel=2)
    return _AVAILABLE[isolation]
