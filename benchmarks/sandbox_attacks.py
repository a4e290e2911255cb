"""Every attack of issue 14 against the code sandbox and the code reward, with the in-interpreter hook off and on.

    python benchmarks/sandbox_attacks.py

For each attack: how it ended (exit status, or the code score for forgeries), whether the host survived (this
process, and a canary process of the same user it tries to kill), whether anything appeared or changed outside the
sandbox (a canary file and the target paths), and the wall time. Prints a markdown table; run it as root to see the
root case (uid 65534 inside).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from rewards.code import run_tests
from rewards.sandbox import SandboxLimits, run_python

OUT = Path(tempfile.mkdtemp(prefix="attack-targets-"))
CANARY = OUT / "canary.txt"
PTH = sysconfig.get_paths()["purelib"] + "/zz_attack.pth"
DISABLE_HOOK = (
    "import gc\nfor o in gc.get_objects():\n    if isinstance(o, dict) and '_blocked' in o and '_hook' not in o:\n"
    "        o['_blocked'] = ('no.such',); o['_writes'] = (); o['_reads'] = (); o['_read_ok'] = ('',); "
    "o['_root'] = ''\n")

ATTACKS = {
    "read a file outside": f"print(open({str(CANARY)!r}).read())",
    "write a file outside": f"open({str(OUT / 'written')!r}, 'w').write('x')",
    "os.open O_CREAT a .pth in site-packages": f"import os\nos.close(os.open({PTH!r}, os.O_WRONLY | os.O_CREAT))",
    "os.system as root": f"import os\nos.system('id > {OUT / 'id.txt'}')",
    "ctypes setuid(0) + system": f"import ctypes\nc = ctypes.CDLL(None)\nc.setuid(0)\nc.system(b'touch {OUT / 'ct'}')",
    "socket to the host": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)",
    "40 forks": "import os, time\nn = 0\nfor _ in range(40):\n    try:\n        pid = os.fork()\n"
                "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n"
                "    n += 1\nprint(n, 'forks succeeded')",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "kill the parent / everyone": "import os, signal\nfor p in (os.getppid(), {canary}, -1):\n    try:\n"
                                  "        os.kill(p, signal.SIGKILL)\n    except OSError:\n        pass",
    "setsid child holds the reward 30 s": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n",
    "setsid child writes after return": f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(4)\n"
                                        f"    open({str(OUT / 'late')!r}, 'w').write('x')\n",
    "memory bomb": "x = bytearray(8 << 30)",
    "huge file": "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))",
}

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(5, 5) == 10"]
FORGERIES = {
    "tally through frames": "import sys\ndef add(a, b):\n    f = sys._getframe(1)\n    while f:\n"
                            "        f.f_globals['_passed'] = 10**6; f = f.f_back\n    return 0",
    "always-equal object": "class E:\n    def __eq__(self, o): return True\ndef add(a, b): return E()",
    "patched exec / print / compile": "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
                                      "builtins.print = lambda *a, **k: None\ndef add(a, b): return 0",
    "exit 0 before the tests": "import os\nos._exit(0)",
    "print a forged tally": "print('\\n' + 'x' * 32 + ' 3')\ndef add(a, b): return 0",
    "correct, prints 300 KB (must score 1)": "print('x' * 300_000)\ndef add(a, b): return a + b",
}


def main() -> None:
    CANARY.write_text("canary")
    canary = subprocess.Popen(["sleep", "600"])
    rows = ["| attack | hook | outcome | host alive | outside files | wall s |", "|---|---|---|---|---|---|"]
    limits = SandboxLimits(wall_s=10, cpu_s=3, memory_mb=512, file_mb=8)
    for name, code in ATTACKS.items():
        code = code.replace("{canary}", str(canary.pid))
        for guard in (False, True):
            before = sorted(p.name for p in OUT.iterdir())
            t = time.monotonic()
            r = run_python(DISABLE_HOOK + code, limits=limits, guard=guard)
            wall = time.monotonic() - t
            time.sleep(4.5 if "after return" in name else 0.2)
            after = sorted(p.name for p in OUT.iterdir())
            outside = "none" if (after == before and CANARY.read_text() == "canary" and not os.path.exists(PTH)) \
                else f"CHANGED: {sorted(set(after) - set(before))}"
            alive = canary.poll() is None
            how = "timeout" if r.timed_out else f"exit {r.returncode}"
            if r.stdout.strip():
                how += f", printed {r.stdout.strip()[:30]!r}"
            err = r.stderr.strip().splitlines()
            if r.returncode and err:
                how += f" ({err[-1][:60]})"
            rows.append(f"| {name} | {'on' if guard else 'off'} | {how} | {'yes' if alive else 'NO'} | {outside} "
                        f"| {wall:.2f} |")
    for name, program in FORGERIES.items():
        t = time.monotonic()
        score, _ = run_tests(program, ADD_TESTS, limits)
        rows.append(f"| code score: {name} | n/a (tests run outside) | score {score:.2f} | "
                    f"{'yes' if canary.poll() is None else 'NO'} | none | {time.monotonic() - t:.2f} |")
    canary.kill()
    print(f"uid {os.geteuid()}, python {sys.version.split()[0]}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
