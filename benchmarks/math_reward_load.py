"""The math reward on a busy machine: answers scored vs None and seconds per call, old verifier vs new.

    python benchmarks/math_reward_load.py [--load 2] [--calls 5] [--impl both|old|new] [--old-ref b75ce9b]

`--load N` starts N busy-loop processes first (like `stress -c N`) and waits `--settle` seconds so the load average
shows them. Each implementation then builds ONE math reward, as a GRPO run does, and calls it `--calls` times on a
batch of 16 completions whose answers need the symbolic check (LaTeX vs decimals, radicals, expressions, sets);
per call it prints seconds, answers scored and answers None (timed out), and the 1-minute load average.

`old` is rewards/math.py at `--old-ref` (the concurrent.futures pool: a worker's cold start counted against the
first answer's 5 s limit, and a timeout killed the pool, so every call paid the cold start again). Its text comes
from `git show` and is imported as a top-level module from a temporary directory (relative imports rewritten to
`rewards.`, registration switched off) so that its spawned workers can import it by name, as they imported
rewards.math. `new` is the working tree's rewards.math (warm workers, the limit counts only the check).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = [  # (completion, gold): none of them settled by the exact-number shortcut
    ("so \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2"),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("\\boxed{\\pi}", "3.14"),
    ("\\boxed{\\frac{2}{3}}", "0.6"),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}"),
    ("\\boxed{2x + 2}", "2(x+1)"),
    ("\\boxed{\\frac{\\pi}{4}}", "\\pi/4"),
    ("\\boxed{\\dfrac{5}{2}}", "2.5"),
    ("\\boxed{x = 3}", "3"),
    ("\\boxed{\\sqrt{18}}", "3\\sqrt{2}"),
    ("\\boxed{(x-1)(x+1)}", "x^2 - 1"),
    ("\\boxed{\\frac{7}{8}}", "0.875"),
]


def old_module(ref: str, tmp: str):
    """rewards/math.py at `ref`, importable by name in this process and in its spawned workers."""
    text = subprocess.run(["git", "show", f"{ref}:rewards/math.py"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    text = text.replace("from .registry import RewardResult, reward, reward_factory",
                        "from rewards.registry import RewardResult\n"
                        "reward = reward_factory = lambda name: (lambda fn: fn)  # not registered twice")
    text = text.replace("from .", "from rewards.")
    Path(tmp, "align_math_old.py").write_text(text)
    sys.path.insert(0, tmp)  # spawn passes sys.path on to the workers
    return importlib.import_module("align_math_old")


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run(impl: str, module, calls: int, timeout_s: float, workers: int) -> list[tuple[float, int, int]]:
    fn = module.math_reward(timeout_s=timeout_s, workers=workers)  # one reward per run
    comps, golds = [c for c, _ in BATCH], [g for _, g in BATCH]
    rows = []
    try:
        for k in range(calls):
            t = time.perf_counter()
            scores = fn(["q"] * len(comps), comps, answer=golds).scores
            dt = time.perf_counter() - t
            scored, none = sum(s is not None for s in scores), sum(s is None for s in scores)
            rows.append((dt, scored, none))
            print(f"{impl:>4} call {k + 1}: {dt:6.2f} s  scored {scored:2d}  None {none:2d}  "
                  f"(correct {sum(s == 1.0 for s in scores):2d}; load {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        fn.close()
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--load", type=int, default=0, help="busy-loop processes to start first (like stress -c N)")
    p.add_argument("--settle", type=float, default=30.0, help="seconds to let the load average rise (with --load)")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--impl", choices=["both", "old", "new"], default="both")
    p.add_argument("--old-ref", default="b75ce9b", help="commit of the old rewards/math.py")
    p.add_argument("--timeout", type=float, default=5.0, help="the reward's per-answer limit (its default: 5 s)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    import math_verify  # noqa: F401 - read from disk once, so neither implementation pays a cold page cache alone

    import rewards.math as new

    print(f"{os.cpu_count()} CPUs; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    loaders = busy(args.load)
    results = {}
    try:
        if args.load:
            time.sleep(args.settle)
            print(f"{args.load} busy-loop processes; load average after {args.settle:g} s: "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        with tempfile.TemporaryDirectory() as tmp:
            impls = ["old", "new"] if args.impl == "both" else [args.impl]
            for impl in impls:
                module = old_module(args.old_ref, tmp) if impl == "old" else new
                results[impl] = run(impl, module, args.calls, args.timeout, args.workers)
    finally:
        for proc in loaders:
            proc.kill()
            proc.wait()
    print(f"summary ({len(BATCH)} answers x {args.calls} calls, limit {args.timeout:g} s, {args.workers} workers, "
          f"{args.load} busy loops):")
    for impl, rows in results.items():
        n_scored, n_none = sum(r[1] for r in rows), sum(r[2] for r in rows)
        print(f"  {impl}: scored {n_scored}, None {n_none}; seconds per call: first {rows[0][0]:.2f}, "
              f"mean {sum(r[0] for r in rows) / len(rows):.2f}, "
              f"mean of the rest {sum(r[0] for r in rows[1:]) / max(1, len(rows) - 1):.2f}")
    return results


if __name__ == "__main__":
    main()
