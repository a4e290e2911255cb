"""Issue 37's attacks on the math rewards, before and after: score, wall time, host RSS peak.

    python benchmarks/math_attacks.py [--code main=/work/main] [--code issue=6e4068b~1] [--limit 60] [--skip-many]

Each (code, reward, attack) runs in a fresh process killed at `--limit` seconds (unbounded code never returns). The
`math` reward runs with its defaults (timeout_s 5, workers 2), its workers warmed before the clock; `exact_answer` in
process. Reported: the scores, the wall time of the one reward call (the limit where it never returned) and the peak
RSS of the trusted process (ru_maxrss, or VmHWM read at the limit; its baseline with rewards and torch imported beside
it). A `--code` is LABEL=PATH (a directory holding rewards/) or LABEL=REF (a git ref of this
repository, its rewards/ exported to a temporary directory); `after` is this checkout. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HANGS = ["\\boxed{(x+1)^{10000}}", "\\boxed{(1+\\sqrt{2})^{9999}}"]  # within the bounds; each > 20 s in sympy alone
ATTACKS = {  # name -> (rewards, completions, golds)
    "\\boxed{1e100000000}": (("exact_answer", "math"), ["\\boxed{1e100000000}"], ["5"]),
    "\\boxed{1e10000000}": (("exact_answer", "math"), ["\\boxed{1e10000000}"], ["5"]),
    "\\boxed{9^{9^{9^9}}}": (("exact_answer", "math"), ["\\boxed{9^{9^{9^9}}}"], ["5"]),
    "two towers + a right answer": (("math",), ["\\boxed{9^{9^{9^9}}}", "\\boxed{10^{10^{10}}}",
                                                "\\boxed{\\frac{1}{2}}"], ["5", "5", "0.5"]),
    "two bounded sympy hangs + a right answer": (("math",), [*HANGS, "\\boxed{\\frac{1}{2}}"], ["5", "5", "0.5"]),
    "16 bounded sympy hangs + a right answer": (("math",), [*HANGS * 8, "\\boxed{\\frac{1}{2}}"], ["5"] * 16 + ["0.5"]),
}

CHILD = r"""
import json, resource, sys, time
import rewards
assert rewards.__file__.startswith(sys.argv[2]), (rewards.__file__, sys.argv[2])
from rewards.math import exact_answer, math_reward
reward, completions, golds = json.loads(sys.argv[1])
mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
base = mb()
if reward == "math":
    fn = math_reward()
    fn.verifier.check([("\\frac{1}{2}", "0.5")])  # the workers are up, before the clock
t = time.perf_counter()
out = exact_answer(None, completions, golds) if reward == "exact_answer" else fn(None, completions, answer=golds)
wall = time.perf_counter() - t
scores, metrics = (out, {}) if isinstance(out, list) else (out.scores, out.metrics)
rss = mb()
if reward == "math":
    fn.close()
print(json.dumps({"scores": scores, "metrics": metrics, "wall": wall, "base": base, "rss": rss}))
"""


def code_dir(spec: str, tmp: str) -> str:
    """A directory with rewards/ for LABEL=PATH or LABEL=REF (exported from this repository)."""
    label, _, where = spec.partition("=")
    if Path(where).is_dir():
        return where
    out = Path(tmp, label)
    out.mkdir()
    archive = subprocess.run(["git", "archive", where, "rewards"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return str(out)


def hwm_mb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def run_one(path: str, reward: str, completions: list[str], golds: list[str], limit: float) -> dict:
    env = {**os.environ, "PYTHONPATH": path}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps([reward, completions, golds]),
                             os.path.realpath(path)], env=env,
                            cwd=path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # `-c`: cwd first
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        rss = hwm_mb(proc.pid)
        proc.kill()
        proc.communicate()
        return {"hung": True, "wall": time.perf_counter() - t, "rss": rss}
    if proc.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def row(name: str, reward: str, label: str, r: dict, limit: float) -> str:
    if "error" in r:
        return f"| {name} | {reward} | {label} | error: {r['error']} | | |"
    if r.get("hung"):
        return f"| {name} | {reward} | {label} | none (killed at {limit:g} s) | > {limit:g} | {r['rss']} |"
    scores = ", ".join("None" if s is None else f"{s:g}" for s in r["scores"])
    counts = ", ".join(f"{k} {v:g}" for k, v in r["metrics"].items() if v)
    return (f"| {name} | {reward} | {label} | {scores}{f' ({counts})' if counts else ''} | {r['wall']:.2f} | "
            f"{r['rss']} (base {r['base']}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--code", action="append", default=None,
                   help="LABEL=PATH or LABEL=REF, the code to attack before (default: main=/work/main)")
    p.add_argument("--limit", type=float, default=60.0, help="seconds before a run is killed as hung")
    p.add_argument("--skip-many", action="store_true", help="leave out the 16-hang batch (a minute per code)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        codes = [(c.partition("=")[0], code_dir(c, tmp)) for c in (args.code or ["main=/work/main"])]
        codes.append(("after", str(ROOT)))
        print(f"load {Path('/proc/loadavg').read_text().split()[:3]}, uid {os.getuid()}, limit {args.limit:g} s\n")
        print("| attack | reward | code | scores | call wall s | host RSS peak MB |")
        print("|---|---|---|---|---|---|")
        for name, (rewards, completions, golds) in ATTACKS.items():
            if args.skip_many and name.startswith("16"):
                continue
            for reward in rewards:
                for label, path in codes:
                    print(row(name, reward, label, run_one(path, reward, completions, golds, args.limit), args.limit),
                          flush=True)


if __name__ == "__main__":
    main()
