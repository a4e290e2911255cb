"""RM_reasoning for code: run the completion's program against the row's tests in the sandbox.

The row's `tests` column is a list of Python assertions (`"assert add(1, 2) == 3"`). The completion's last fenced
code block (```python ... ```), or the whole completion when it has none, runs in `rewards.sandbox` with each test
after it; the score is the share of tests that pass. A syntax error or a crash before the tests scores 0; so does a
program that times out (that is a wrong program), and timeouts are counted in `reward/<name>/timeouts`.
The tally is read back through a marker keyed by a random nonce that the program is not shown.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import secrets

from .registry import RewardResult, reward_factory
from .sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)

_HARNESS = '''
import sys as _sys
_nonce = _sys.stdin.readline().strip()
_tests = {tests!r}
_ns = {{"__name__": "solution"}}
_passed = 0
try:
    exec(compile({program!r}, "solution.py", "exec"), _ns)
except BaseException:
    _tests = []
for _t in _tests:
    try:
        exec(compile(_t, "test.py", "exec"), _ns)
        _passed += 1
    except BaseException:
        pass
print("\\n" + _nonce + " " + str(_passed), flush=True)
'''


def extract_code(text: str) -> str:
    """The last fenced code block, else the text itself."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def run_tests(program: str, tests: list[str], limits: SandboxLimits) -> tuple[float, bool]:
    """(share of tests passed, timed out)."""
    if not tests:
        return 0.0, False
    nonce = secrets.token_hex(16)
    result = run_python(_HARNESS.format(tests=list(tests), program=program), stdin=nonce + "\n", limits=limits)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(nonce + " "):
            return int(line.split()[1]) / len(tests), result.timed_out
    return 0.0, result.timed_out


@reward_factory("code")
def code_reward(wall_s: float = 10.0, cpu_s: int = 5, memory_mb: int = 512, workers: int = 2):
    """Share of the row's `tests` that the completion's code passes, run in the sandbox."""
    limits = SandboxLimits(wall_s=wall_s, cpu_s=cpu_s, memory_mb=memory_mb)

    def score(prompts, completions, tests, **_) -> RewardResult:
        test_lists = [json.loads(t) if isinstance(t, str) else list(t) for t in tests]
        with cf.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda a: run_tests(extract_code(a[0]), a[1], limits),
                                    zip(completions, test_lists)))
        return RewardResult([r[0] for r in results], {"timeouts": float(sum(r[1] for r in results))})

    return score
