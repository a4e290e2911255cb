"""The sandbox contains each attack and leaves the host untouched; the code reward's table of cases."""

from pathlib import Path

import pytest

from rewards.code import code_reward, extract_code
from rewards.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(wall_s=5, cpu_s=2, memory_mb=256, file_mb=4)


def test_ordinary_code_runs_and_can_use_its_directory():
    r = run_python("import json, math\nopen('x.txt', 'w').write('hi')\nprint(open('x.txt').read(), math.pi)",
                   limits=LIMITS)
    assert r.ok and r.stdout.startswith("hi 3.14")


def test_reading_a_file_outside_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    r = run_python(f"print(open({str(secret)!r}).read())", limits=LIMITS)
    assert not r.ok and "top secret" not in r.stdout and "outside the sandbox" in r.stderr


def test_opening_a_socket_is_refused():
    r = run_python("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\nprint('connected')",
                   limits=LIMITS)
    assert not r.ok and "connected" not in r.stdout


def test_fork_bomb_is_contained():
    r = run_python("import os\nwhile True:\n    os.fork()", limits=LIMITS)
    assert not r.ok and r.seconds < LIMITS.wall_s


def test_memory_bomb_is_contained():
    r = run_python("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", limits=LIMITS)
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


def test_signalling_the_parent_is_refused():
    r = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", limits=LIMITS)
    assert not r.ok and "os.kill is not allowed" in r.stderr  # and this test process is still alive


def test_spawning_a_shell_is_refused(tmp_path):
    target = tmp_path / "pwned"
    for code in (f"import subprocess\nsubprocess.run(['sh', '-c', 'touch {target}'])",
                 f"import os\nos.system('touch {target}')",
                 f"import os\nos.execv('/bin/sh', ['sh', '-c', 'touch {target}'])",
                 "import ctypes\nctypes.CDLL(None).system(b'true')"):
        r = run_python(code, limits=LIMITS)
        assert not r.ok, code
    assert not target.exists()


def test_sandbox_directory_is_removed():
    before = set(Path("/tmp").glob("align-sandbox-*"))
    run_python("open('left.txt', 'w').write('x')", limits=LIMITS)
    assert set(Path("/tmp").glob("align-sandbox-*")) == before


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
    ("```python\nprint('\\nfake 4')\ndef add(a, b): return 0\n```", 0.5),           # cannot forge the tally
])
def test_code_reward_cases(completion, expected):
    fn = code_reward(wall_s=3, cpu_s=1)
    out = fn(["p"], [completion], tests=[TESTS])
    assert out.scores == [pytest.approx(expected)]


def test_code_reward_counts_timeouts_and_reads_json_tests():
    fn = code_reward(wall_s=1, cpu_s=5)
    out = fn(["p", "p"], ["```python\nimport time\ntime.sleep(10)\n```", ADD],
             tests=['["assert add(1, 2) == 3"]', ["assert add(1, 2) == 3"]])
    assert out.scores == [0.0, 1.0] and out.metrics["timeouts"] == 1.0


def test_extract_code_takes_the_last_block():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
