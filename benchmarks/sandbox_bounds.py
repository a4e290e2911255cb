"""Issue 37's attacks on the sandbox as one boundary: shared kernel state between sandboxes, per-process limits that
a program spreads out of, host disk, cleanup, a sandbox outliving its host.

    python benchmarks/sandbox_bounds.py [--only NAME ...]

Each attack runs in a fresh host process (`--one NAME`, the trusted side: it calls `run_python`), so its outcome,
whether the host survived, its wall time and the host's RSS peak (ru_maxrss) are its own. That host process and all
it starts run in a measuring cgroup made here (v1 cpuacct and memory, where writable): its CPU time and memory peak
(memfd and tmpfs pages included, which are nobody's RSS) are what the attack cost the machine. Limits: wall 10 s, CPU 5 s, memory 512 MB, as in the issue. Run it as root for the root case; it
works against the sandbox before issue 37 too (PYTHONPATH=<older checkout>), where the new result fields are absent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

LIMITS = dict(wall_s=10, cpu_s=5, memory_mb=512)

# 16 MB per memfd (RLIMIT_FSIZE binds each one), as many as the open-file limit allows
MEMFD = ("import os\nfds, mb = [], 0\ntry:\n    while mb < 1536:\n        fds.append(os.memfd_create('x'))\n"
         "        for _ in range(16):\n            os.write(fds[-1], b'x' * (1 << 20)); mb += 1\n"
         "except OSError as e:\n    print('stopped', e.strerror)\nprint('held MB', mb, flush=True)\n"
         "import time; time.sleep(1)")
SHARED_MAP = ("import mmap, time\nmb = 0\nmaps = []\ntry:\n    while mb < 1536:\n"
              "        m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)\n"
              "        m.write(b'x' * (64 << 20)); maps.append(m); mb += 64\nexcept (OSError, ValueError) as e:\n"
              "    print('stopped', e)\nprint('held MB', mb, flush=True)\ntime.sleep(1)")
CHILDREN = ("import os\nfor _ in range(30):\n    if os.fork() == 0:\n        while True:\n            pass\n"
            "for _ in range(30):\n    os.wait()")
# 16 MB per file (RLIMIT_FSIZE binds each one), 64 files
FALLOCATE = ("import os\nmb = 0\ntry:\n    for i in range(64):\n"
             "        fd = os.open('big%d' % i, os.O_CREAT | os.O_WRONLY)\n"
             "        os.posix_fallocate(fd, 0, 16 << 20); os.close(fd); mb += 16\n"
             "except OSError as e:\n    print('stopped', e.strerror)\nprint('fallocated MB', mb)")
FILES = ("import os\nn = 0\ntry:\n    for i in range(200000):\n        open('f%d' % i, 'w').close(); n += 1\n"
         "except OSError as e:\n    print('stopped', e.strerror)\nprint('files', n)")
DEEP = ("import os\nfor _ in range(3000):\n    os.mkdir('d'); os.chdir('d')\nprint('made 3000 nested directories')")
# keyctl(2) by number (x86_64: add_key 248, keyctl 250): KEY_SPEC_USER_KEYRING = -4
KEYS = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
        "def err(r):\n    return 'refused: ' + os.strerror(ctypes.get_errno()) if r < 0 else None\n")
KEY_WRITE = KEYS + ("k = libc.syscall(248, b'user', b'{desc}', b'the expected values', 19, ctypes.c_long(-4))\n"
                    "print(err(k) or 'stored key %d' % k)\nif k > 0:\n    libc.syscall(250, 15, k, 60)  # expire in 60 s")
KEY_READ = KEYS + ("k = libc.syscall(250, 10, ctypes.c_long(-4), b'user', b'{desc}', 0)\nbuf = ctypes.create_string_buffer(64)\n"
                   "n = libc.syscall(250, 11, k, buf, 64) if k > 0 else -1\n"
                   "print(err(k) or 'read: ' + buf.raw[:n].decode())")
HOLD = ("import os, time\nn = 0\nfor _ in range(40):\n    try:\n        if os.fork() == 0:\n            time.sleep(8)\n"
        "            os._exit(0)\n        n += 1\n    except OSError:\n        break\nprint('holds', n, flush=True)\ntime.sleep(8)")
SIBLING = ("import os\nn = 0\nfor _ in range(5):\n    try:\n        if os.fork() == 0:\n            os._exit(0)\n"
           "        n += 1\n    except OSError as e:\n        print('fork refused:', e.strerror)\n        break\n"
           "print('forked', n, 'of 5')")


def _run(code: str, **limits):
    from rewards.sandbox import SandboxLimits, run_python

    return run_python(code, limits=SandboxLimits(**{**LIMITS, **limits}))


def _filter_off() -> str:
    """Switch the seccomp filter off (where there is one) to measure the layers under it alone."""
    import rewards.sandbox as sandbox

    if hasattr(sandbox, "_seccomp_config"):
        sandbox._seccomp_config = lambda: None
        return ""
    return "(no filter) "


def _describe(r) -> str:
    how = "timeout" if r.timed_out else f"exit {r.returncode}"
    out = " / ".join(line for line in r.stdout.strip().splitlines()[-2:])
    err = (r.stderr.strip().splitlines() or [""])[-1][:70]
    extra = "".join(f", sandbox {k} {getattr(r, k):.2f}" for k in ("cpu_s", "memory_peak_mb")
                    if getattr(r, k, None) is not None)
    return f"{how}{', ' + out if out else ''}{' (' + err + ')' if r.returncode and err else ''}{extra}"


def one(name: str) -> str:
    if name == "memfd over the memory limit":
        return _describe(_run(MEMFD))
    if name == "memfd, seccomp filter off (the cgroup alone)":
        return _filter_off() + _describe(_run(MEMFD))
    if name == "shared anonymous maps over the memory limit":
        return _describe(_run(SHARED_MAP))
    if name == "30 children over the CPU limit":
        return _describe(_run(CHILDREN))
    if name == "fallocate 1 GB in /work":
        return _describe(_run(FALLOCATE))
    if name == "200k files in /work":
        return _describe(_run(FILES))
    if name == "3000 nested directories (cleanup)":
        try:
            return _describe(_run(DEEP))
        except BaseException as e:  # what the reward would have raised
            left = len(list(Path(os.environ.get("TMPDIR", "/tmp")).glob("align-sandbox-*")))
            return f"run_python RAISED {type(e).__name__}; sandbox dirs left in /tmp: {left}"
    if name == "keyring, seccomp filter off (user namespaces alone)":
        _filter_off()
        name = "keyring: one sandbox stores, the next reads"
    if name == "keyring: one sandbox stores, the next reads":
        desc = f"align37-{os.getpid()}"
        w, r = _run(KEY_WRITE.replace("{desc}", desc)), _run(KEY_READ.replace("{desc}", desc))
        return f"writer: {w.stdout.strip()}; reader: {r.stdout.strip() or _describe(r)}"
    if name == "a sandbox's whole CPU time, 30 children, wall 30 s":
        return _describe(_run(CHILDREN, wall_s=30))
    if name == "nproc: one sandbox holds 40 forks, a sibling forks 5":
        from rewards.sandbox import SandboxLimits, SandboxProcess

        with SandboxProcess({"main.py": HOLD}, "main.py", SandboxLimits(**LIMITS)) as holder:
            held = holder.proc.stdout.readline().decode().strip()  # once it holds all it could fork
            r = _run(SIBLING)
        return f"holder: {held}; sibling: {r.stdout.strip() or _describe(r)}"
    if name == "host SIGKILLed mid-run":
        code = ("import sys\nsys.path[:0] = %r\nfrom rewards.sandbox import SandboxLimits, run_python\n"
                "run_python('import time\\ntime.sleep(60)', limits=SandboxLimits(wall_s=60, cpu_s=5))" % sys.path)
        host = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 10
        while not (mine := _sleepers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        host.kill()
        host.wait()
        time.sleep(1.0)
        left = _sleepers()
        for pid in left:  # (the benchmark's own clean-up of what the old sandbox leaves)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return f"sandbox processes while the host ran: {len(mine)}; 1 s after its SIGKILL: {len(left)}"
    raise KeyError(name)


def _sleepers() -> list[int]:
    """Processes running the sleeper program (the sandboxed interpreter, under any uid)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
                if b"-S" in cmd and cmd[-2:-1] in ([b"main.py"], [b"guard.py"]):
                    found.append(int(p.name))
            except OSError:
                pass
    return found


NAMES = ["memfd over the memory limit", "memfd, seccomp filter off (the cgroup alone)",
         "shared anonymous maps over the memory limit", "30 children over the CPU limit",
         "a sandbox's whole CPU time, 30 children, wall 30 s",
         "fallocate 1 GB in /work", "200k files in /work", "3000 nested directories (cleanup)",
         "keyring: one sandbox stores, the next reads", "keyring, seccomp filter off (user namespaces alone)",
         "nproc: one sandbox holds 40 forks, a sibling forks 5",
         "host SIGKILLed mid-run"]


def _own_cgroup(controller: str) -> str | None:
    """This process's cgroup directory in the v1 hierarchy of `controller`, if mounted."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if controller in ctrls.split(","):
                d = f"/sys/fs/cgroup/{controller}{path}"
                return d if os.path.isdir(d) else None
    return None


def _measuring_cgroups(name: str) -> dict[str, str]:
    made = {}
    for ctrl in ("cpuacct", "memory"):
        parent = _own_cgroup(ctrl)
        if parent:
            try:
                os.mkdir(f"{parent}/{name}")
                made[ctrl] = f"{parent}/{name}"
            except OSError:
                pass
    return made


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    if args.one:
        for d in filter(None, os.environ.get("BENCH_CGROUPS", "").split(":")):
            with open(d + "/cgroup.procs", "w") as f:
                f.write("0")
        try:
            outcome = one(args.one)
        except BaseException as e:
            outcome = f"host RAISED {type(e).__name__}: {str(e)[:80]}"
        print(json.dumps({"outcome": outcome, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    import rewards.sandbox as sandbox

    print(f"uid {os.geteuid()}, sandbox from {sandbox.__file__}, load {open('/proc/loadavg').read().split()[:3]}")
    rows = ["| attack | outcome | host alive | wall s | host RSS peak MB | CPU-s, all processes | memory peak MB, all |",
            "|---|---|---|---|---|---|---|"]
    for i, name in enumerate(args.only or NAMES):
        cg = _measuring_cgroups(f"align-bench-{os.getpid()}-{i}")
        t = time.monotonic()
        p = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "BENCH_CGROUPS": ":".join(cg.values())})
        wall = time.monotonic() - t
        time.sleep(0.5)
        cpu = int(Path(cg["cpuacct"], "cpuacct.usage").read_text()) / 1e9 if "cpuacct" in cg else float("nan")
        mem = int(Path(cg["memory"], "memory.max_usage_in_bytes").read_text()) / 2**20 if "memory" in cg else float("nan")
        for d in cg.values():
            try:
                os.rmdir(d)
            except OSError:
                pass
        try:
            res = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            res = {"outcome": f"host died: {p.returncode} {p.stderr.strip()[-100:]}", "rss_mb": float("nan")}
        alive = "yes" if p.returncode == 0 else f"NO ({p.returncode})"
        outcome = res["outcome"].replace("\n", " / ")
        rows.append(f"| {name} | {outcome} | {alive} | {wall:.2f} | {res['rss_mb']:.0f} | {cpu:.1f} | {mem:.0f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
