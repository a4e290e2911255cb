"""The sandbox holds with its in-interpreter guard switched off (the OS is the boundary), and the code reward's
verdict cannot be forged from inside the program; the table of ordinary cases."""

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from rewards.code import code_reward, extract_code, run_tests
from rewards.sandbox import SANDBOX_UID_BASE, SandboxLimits, isolation_problem, run_python

pytestmark = pytest.mark.skipif(isolation_problem() is not None, reason=str(isolation_problem()))

LIMITS = SandboxLimits(wall_s=5, cpu_s=2, memory_mb=256, file_mb=4)
GUARD = pytest.mark.parametrize("guard", [False, True], ids=["hook-off", "hook-on"])

# Switches the audit hook off from inside, as issue 14's attacker did: the guard's tables emptied through frames.
DISABLE_HOOK = """
import sys, gc
for obj in gc.get_objects():
    if isinstance(obj, dict) and "_blocked" in obj and "_hook" not in obj:
        obj["_blocked"] = ("no.such.event",); obj["_writes"] = (); obj["_reads"] = (); obj["_read_ok"] = ("",)
        obj["_root"] = ""
"""


def _nobody_processes() -> set[int]:
    """Live processes of a sandbox user: 65534, or (started as root) an id of SANDBOX_UID_BASE's range."""
    pids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                status = (p / "status").read_text()
                uid = int(status.split("Uid:")[1].split()[0])
                if (uid == 65534 or SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + (1 << 22)) \
                        and "State:\tZ" not in status:
                    pids.add(int(p.name))
            except OSError:
                pass
    return pids


BEFORE = _nobody_processes()  # whatever the machine already runs as nobody


def sandbox_processes(wait_s: float = 3.0) -> set[int]:
    """Processes of a sandbox user still alive, waiting up to `wait_s` for a namespace's teardown."""
    deadline = time.monotonic() + wait_s
    while (left := _nobody_processes() - BEFORE) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_ordinary_code_runs_and_can_use_its_directory():
    r = run_python("import json, math\nopen('x.txt', 'w').write('hi')\nprint(open('x.txt').read(), math.pi)",
                   limits=LIMITS)
    assert r.ok and r.stdout.startswith("hi 3.14")


@GUARD
def test_runs_as_an_unprivileged_user_in_its_own_namespaces(guard):
    r = run_python(DISABLE_HOOK + "import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.getpid())",
                   limits=LIMITS, guard=guard)
    assert r.ok and r.stdout.split()[:2] == ["65534", "65534"] and r.stdout.split()[-1] == "1"


@GUARD
def test_files_outside_are_invisible(tmp_path, guard):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    for path in (str(secret), "/etc/shadow", "/root/.bashrc", sys.prefix + "/pyvenv.cfg"):
        r = run_python(DISABLE_HOOK + f"print(open({path!r}).read())", limits=LIMITS, guard=guard)
        assert not r.ok and "top secret" not in r.stdout and r.stdout == "", path


@GUARD
def test_nothing_outside_can_be_written(tmp_path, guard):
    """Including a .pth file in the interpreter's site-packages (it would run in every later Python start)."""
    import site
    import sysconfig

    targets = [str(tmp_path / "pwned"), sysconfig.get_paths()["purelib"] + "/evil.pth",
               sysconfig.get_paths()["stdlib"] + "/evil.pth", *(p + "/evil.pth" for p in site.getsitepackages())]
    code = DISABLE_HOOK + "import os\nfor t in %r:\n    try:\n        os.close(os.open(t, os.O_WRONLY | os.O_CREAT))\n" \
        "        print('wrote', t)\n    except OSError as e:\n        print('refused', t, e.errno)\n" % (targets,)
    r = run_python(code, limits=LIMITS, guard=guard)
    assert "wrote" not in r.stdout
    assert not any(os.path.exists(t) for t in targets)


@GUARD
def test_no_network(guard):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    got = []
    threading.Thread(target=lambda: got.append(_accept(server)), daemon=True).start()
    r = run_python(DISABLE_HOOK + f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "print('connected')", limits=LIMITS, guard=guard)
    time.sleep(0.2)
    server.close()
    assert "connected" not in r.stdout and got in ([], [None])


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


@GUARD
def test_fork_bomb_is_contained(guard):
    t = time.monotonic()
    r = run_python(DISABLE_HOOK + "import os\nwhile True:\n    os.fork()", limits=LIMITS, guard=guard)
    assert not r.ok and time.monotonic() - t < LIMITS.wall_s + 2
    assert sandbox_processes() == set()


@GUARD
def test_process_limit_binds(guard):
    code = DISABLE_HOOK + ("import os, time\nn = 0\nfor _ in range(40):\n    try:\n        if os.fork() == 0:\n"
                           "            time.sleep(2); os._exit(0)\n        n += 1\n    except OSError:\n"
                           "        break\nprint(n)")
    r = run_python(code, limits=LIMITS, guard=guard)
    assert r.ok and int(r.stdout) < LIMITS.processes


def test_memory_bomb_is_contained():
    r = run_python(DISABLE_HOOK + "x = bytearray(4 * 1024 ** 3)\nprint('allocated')", limits=LIMITS)
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    r = run_python("while True:\n    pass", limits=LIMITS)
    assert not r.ok and r.seconds < LIMITS.wall_s + 1


def test_wall_clock_limit_kills_a_sleeper():
    r = run_python("import time\ntime.sleep(60)", limits=SandboxLimits(wall_s=1.5, cpu_s=2))
    assert r.timed_out and r.seconds < 5


def test_huge_file_is_cut_at_the_file_size_limit():
    r = run_python("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 1024 * 1024)", limits=LIMITS)
    assert not r.ok and "File too large" in r.stderr


@GUARD
def test_signals_reach_nothing_outside(guard):
    import subprocess

    canary = subprocess.Popen(["sleep", "30"])  # a process of the user align runs as
    code = DISABLE_HOOK + ("import os, signal\nfor pid in (os.getppid(), %d, %d, -1, 0):\n    try:\n"
                           "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                           % (os.getpid(), canary.pid))
    run_python(code, limits=LIMITS, guard=guard)
    time.sleep(0.2)
    alive = canary.poll() is None
    canary.kill()
    assert alive  # (and this test process is still here to assert it)


@GUARD
def test_a_detached_child_dies_with_the_program(tmp_path, guard):
    """setsid() + a sleeping child that would outlive the reward or hold it past the wall-clock limit."""
    code = DISABLE_HOOK + ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
                           "    open('late', 'w').write('x')\n    os._exit(0)\nprint('parent done')")
    t = time.monotonic()
    r = run_python(code, limits=SandboxLimits(wall_s=10, cpu_s=2), guard=guard)
    assert r.ok and time.monotonic() - t < 3
    assert sandbox_processes() == set()


@GUARD
def test_shells_and_ctypes_run_only_as_nobody_inside(tmp_path, guard):
    target = tmp_path / "pwned"
    for code in (f"import subprocess\nsubprocess.run(['sh', '-c', 'id > {target}; touch /usr/pwned'])",
                 f"import os\nos.system('touch {target} /usr/pwned')",
                 "import ctypes\nprint(ctypes.CDLL(None).setuid(0))"):
        r = run_python(DISABLE_HOOK + code, limits=LIMITS, guard=guard)
        if "setuid" in code and not guard:                    # the hook refuses ctypes when on
            assert r.stdout.strip() == "-1", r                 # setuid(0) fails as nobody
    assert not target.exists() and not Path("/usr/pwned").exists()


def test_sandbox_directory_is_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (other sandboxes may run beside the test)
    run_python("open('left.txt', 'w').write('x')", limits=LIMITS)
    assert list(tmp_path.iterdir()) == []


ADD = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]


@pytest.mark.parametrize("completion,expected", [
    (ADD, 1.0),                                                                     # pass
    ("```python\ndef add(a, b):\n    return a - b\n```", 0.25),                     # fail but one (0 - 0)
    ("```python\ndef add(a, b):\n    return a + b if a > 0 else 1\n```", 0.5),      # partial
    ("```python\ndef add(a, b)\n    return a + b\n```", 0.0),                       # syntax error
    ("```python\nwhile True:\n    pass\n```", 0.0),                                 # timeout
    ("def add(a, b):\n    return b + a", 1.0),                                      # no fence: the whole text
    ("```python\nraise SystemExit(0)\n```", 0.0),                                   # exits before the tests
    ("```python\nprint('\\nfake 4')\ndef add(a, b): return 0\n```", 0.5),           # printing is not scoring
    ("```python\nprint('x' * 300_000)\ndef add(a, b): return a + b\n```", 1.0),     # output size is irrelevant
])
def test_code_reward_cases(completion, expected):
    fn = code_reward(wall_s=3, cpu_s=1)
    out = fn(["p"], [completion], tests=[TESTS])
    assert out.scores == [pytest.approx(expected)]


# Each tries to score on tests it fails (add returns a wrong value, or nothing at all).
HARD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(5, 5) == 10"]
FORGERIES = {
    "tally through frames": "import sys\ndef add(a, b):\n    f = sys._getframe(1)\n"
                            "    while f:\n        f.f_globals['_passed'] = 10**6; f = f.f_back\n    return 0",
    "always-equal object": "class E:\n    def __eq__(self, o): return True\n    __ne__ = lambda s, o: False\n"
                           "def add(a, b): return E()",
    "int subclass": "class I(int):\n    def __eq__(self, o): return True\ndef add(a, b): return I(0)",
    "patched builtins": "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.print = lambda *a, **k: None\n"
                        "builtins.compile = lambda *a, **k: compile('pass', 'x', 'exec')\ndef add(a, b): return 0",
    "exit early with success": "import os\nos._exit(0)",
    "forged reply on the pipe": "import os\ndef add(a, b):\n    for fd in range(3, 10):\n        try:\n"
                                "            os.write(fd, b'[\"ok\", [\"i\", \"7\"]]\\n' * 4)\n"
                                "        except OSError:\n            pass\n    return 0",
    "raise AssertionError away": "import builtins\nbuiltins.AssertionError = type('A', (Exception,), {})\n"
                                 "def add(a, b): return 0",
    "huge reply": "def add(a, b): return 'x' * (8 << 20)",
    "nested bomb": "def add(a, b):\n    x = []\n    for _ in range(10000): x = [x]\n    return x",
    "parser-depth bomb on the pipe": "import os\ndef add(a, b):\n    for fd in range(3, 10):\n        try:\n"
                                     "            os.write(fd, b'[' * 200000 + b'\\n')\n        except OSError:\n"
                                     "            pass\n    return 0",
    "read the tests": "import gc\ndef add(a, b):\n    for o in gc.get_objects():\n"
                      "        if isinstance(o, str) and o.startswith('assert add('): return int(o.split('== ')[1])\n"
                      "    return 0",
    "hook off then shell": DISABLE_HOOK + "import os\nos.system('true')\ndef add(a, b): return 0",
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_scores_are_zero(name):
    score, _ = run_tests(FORGERIES[name], HARD_TESTS, SandboxLimits(wall_s=5, cpu_s=2))
    assert score == 0.0, name


def test_humaneval_style_check_function():
    """HumanEval's `test` (a check(candidate) with its own asserts) + the call, as one test."""
    test = ("def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"
            "    assert abs(candidate([0.5, 0.25]) - 0.75) < 1e-9\n\ncheck(total)")
    good = "def total(xs):\n    return sum(xs)"
    assert run_tests(good, [test], LIMITS)[0] == 1.0
    assert run_tests("def total(xs):\n    return len(xs)", [test], LIMITS)[0] == 0.0
    assert run_tests(FORGERIES["always-equal object"].replace("add(a, b)", "total(xs)"), [test], LIMITS)[0] == 0.0
    shadow = "def abs(x):\n    return 0\ndef total(xs):\n    return 12345"   # abs(wrong - 0.75) < 1e-9 "passes"
    assert run_tests(shadow, [test], LIMITS)[0] == 0.0


def test_values_keep_their_types_and_exceptions_their_names():
    program = ("def f(x):\n    if x < 0: raise ValueError('neg')\n    return (x, [x], {x: {x}}, frozenset([x]), "
               "str(x), float(x), x == 1, None, b'x', complex(x, 1))")
    tests = ["assert f(1) == (1, [1], {1: {1}}, frozenset([1]), '1', 1.0, True, None, b'x', complex(1, 1))",
             "assert type(f(1)[0]) is int and f(1)[6] is True",
             "try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError"]
    assert run_tests(program, tests, LIMITS)[0] == 1.0


def test_code_reward_counts_timeouts_and_reads_json_tests():
    fn = code_reward(wall_s=1, cpu_s=5)
    out = fn(["p", "p"], ["```python\nimport time\ntime.sleep(10)\n```", ADD],
             tests=['["assert add(1, 2) == 3"]', ["assert add(1, 2) == 3"]])
    assert out.scores == [0.0, 1.0] and out.metrics["timeouts"] == 1.0


def test_extract_code_takes_the_last_block():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"


def test_a_program_that_never_reads_its_large_stdin_still_times_out():
    """More stdin than a pipe holds (64 KB) to a program that never reads it: the deadline is kept, not a blocked
    write in the trusted process."""
    import time

    t = time.monotonic()
    r = run_python("import time\ntime.sleep(60)", stdin="x" * 1_000_000, limits=SandboxLimits(wall_s=2))
    assert r.timed_out and time.monotonic() - t < 15
