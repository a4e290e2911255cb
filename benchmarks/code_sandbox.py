"""Wall time of one code-reward call (one completion against its tests) in the sandbox: median over repeats.

    python benchmarks/code_sandbox.py [--repeats 30]

Cases: the 4 assertions of tests/test_sandbox.py's `add` task, a HumanEval-style check(candidate) with 10
asserts (one completion per call, workers=1), and a reward call of 16 completions x the 4 asserts with workers=2
(issue 37's overhead figure). Prints the median and the 10th / 90th percentiles in milliseconds, the machine's load,
and whether the isolation is the OS's.
"""

from __future__ import annotations

import argparse
import statistics
import time

from rewards.code import code_reward
from rewards.sandbox import isolation_problem

ADD = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]
CHECK = "def check(candidate):\n" + "".join(f"    assert candidate({list(range(i))}) == {sum(range(i))}\n"
                                           for i in range(10)) + "\ncheck(total)"
TOTAL = "```python\ndef total(xs):\n    return sum(xs)\n```"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    print(f"isolation: {'OS namespaces' if isolation_problem() is None else isolation_problem()}")
    print(f"load {open('/proc/loadavg').read().split()[:3]}")
    one, two = code_reward(wall_s=10, cpu_s=5, workers=1), code_reward(wall_s=10, cpu_s=5, workers=2)
    for name, fn, n, completion, tests in (("add, 4 asserts", one, 1, ADD, ADD_TESTS),
                                           ("check(candidate), 10 asserts", one, 1, TOTAL, [CHECK]),
                                           ("16 completions x 4 asserts, workers=2", two, 16, ADD, ADD_TESTS)):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn(["p"] * n, [completion] * n, tests=[tests] * n)
            times.append(time.perf_counter() - t)
            assert out.scores == [1.0] * n, out.scores
        q = statistics.quantiles(times, n=10)
        print(f"{name}: median {1e3 * statistics.median(times):.1f} ms (p10 {1e3 * q[0]:.1f}, p90 {1e3 * q[-1]:.1f}) "
              f"over {args.repeats} calls")


if __name__ == "__main__":
    main()
