"""The quickstart over several seeds: the eval table after each stage as mean ± spread, stage 1's gain, stage 2's
alignment tax, the reward-model check and the wall time of each run.

    python benchmarks/quickstart_seeds.py [--seeds 0,1,2] [--root runs/quickstart_seeds] [--experts-impl eager]
                                          [key=value ...]

Each seed S runs `align run quickstart run_dir=ROOT/seed-S` with every stage's `seed=S` (the tiny model's random
weights, data order, sampling), in its own process, one after another; `key=value` overrides go to every run.
`--experts-impl` forces the routed-experts kernel of every training stage (eager | grouped_mm | batched_mm): on a
CPU of one kind (AMX or not) the other kernel's different rounding stands in for a CPU of the other kind. A seed
whose run directory already holds a report is read, not re-run (delete it to re-run). Spread is the sample standard
deviation over seeds, with the range; accuracy cells of one run carry one binomial standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("tiny", "sft", "rm_helpful", "rm_safety", "reasoning", "preference")
POLICIES = ("tiny", "sft", "reasoning", "preference")
QUANTITIES = [("eval/accuracy", "held-out accuracy", 100, "%"), ("eval/helpful_rm", "RM_helpful", 1, ""),
              ("eval/safety_rm", "RM_safety", 1, ""), ("eval/refusal_rate", "refusals (harmful)", 100, "%"),
              ("eval/over_refusal_rate", "over-refusals (benign)", 100, "%")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--root", default="runs/quickstart_seeds", help="one run directory per seed under it")
    p.add_argument("--experts-impl", choices=["auto", "eager", "grouped_mm", "batched_mm"], default="auto",
                   help="routed-experts kernel of the sft / grpo stages (the stand-in for another CPU kind)")
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides for every run")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        p.error("--seeds names no seed")
    return args


def run_overrides(seed: int, run_dir: Path, experts_impl: str, extra: list[str]) -> list[str]:
    """The `align run quickstart` overrides of one seed's run."""
    out = [f"run_dir={run_dir}"] + [f"stages.{s}.seed={seed}" for s in STAGES]
    if experts_impl != "auto":
        out += [f"stages.{s}.model.experts_impl={experts_impl}" for s in ("sft", "reasoning", "preference")]
    return out + list(extra)


def run_seed(seed: int, run_dir: Path, experts_impl: str, extra: list[str]) -> float | None:
    """Run one seed's quickstart (unless its report exists); its wall time in seconds, None when it was read."""
    if (run_dir / "report.md").is_file():
        return None
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "align", "run", "quickstart", *run_overrides(seed, run_dir, experts_impl, extra)]
    start = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"seed {seed}: `{' '.join(cmd)}` failed (exit {done.returncode}); see {log.name}")
    return time.time() - start


def read_run(run_dir: Path) -> dict:
    """The eval.json of each policy stage and stage 1's held-out accuracy curve (step -> accuracy)."""
    out = {"eval": {}, "curve": {}}
    for stage in POLICIES:
        f = run_dir / stage / "eval.json"
        if f.is_file():
            out["eval"][stage] = json.loads(f.read_text())
    metrics = run_dir / "reasoning" / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "eval/accuracy" in row:
                out["curve"][row["step"]] = row["eval/accuracy"]
    return out


def mean_spread(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, sample standard deviation (0 for one value), min, max)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd, min(values), max(values)


def fmt(values: list[float], scale: float, unit: str) -> str:
    vals = [scale * v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return ""
    m, sd, lo, hi = mean_spread(vals)
    digits = 1 if scale == 100 else 2  # shares and points in %, scores to 2 places
    return f"{m:.{digits}f}{unit} ± {sd:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def table(runs: dict[int, dict]) -> list[str]:
    """The eval table after each stage, each cell mean ± sd (min–max) over the seeds."""
    head = "| after stage | " + " | ".join(q[1] for q in QUANTITIES) + " |"
    lines = [head, "|---|" + "---|" * len(QUANTITIES)]
    for stage in POLICIES:
        evs = [r["eval"][stage] for r in runs.values() if stage in r["eval"]]
        if evs:
            cells = [fmt([ev.get(k) for ev in evs], scale, unit) for k, _, scale, unit in QUANTITIES]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


def components(runs: dict[int, dict]) -> list[str]:
    """Stage 2's reward components on held-out prompts after each stage, mean ± sd over the seeds."""
    rows = {stage: [r["eval"][stage]["reward_components"] for r in runs.values()
                    if r["eval"].get(stage, {}).get("reward_components")] for stage in POLICIES}
    first = next((c[0] for c in rows.values() if c), None)
    if first is None:
        return []
    labels = list(first["weights"])
    lines = ["| after stage | " + " | ".join(labels) + " | weighted sum |", "|---|" + "---|" * (len(labels) + 1)]
    for stage, comps in rows.items():
        if comps:
            cells = [fmt([c["means"].get(k) for c in comps], 1, "") for k in labels]
            lines.append(f"| {stage} | " + " | ".join(cells) + f" | {fmt([c['total'] for c in comps], 1, '')} |")
    return lines


def per_seed(runs: dict[int, dict], walls: dict[int, float | None]) -> list[str]:
    """One line per seed: SFT -> stage 1 -> stage 2 accuracy, stage 1's curve, the RM check, the wall time."""
    lines = []
    for seed, r in runs.items():
        ev = r["eval"]
        acc = {s: ev[s].get("eval/accuracy") for s in ("sft", "reasoning", "preference") if s in ev}
        n = ev.get("sft", {}).get("counts", {}).get("reasoning", 0)
        se = f" (± {100 * math.sqrt(0.25 / n):.1f} at most, n={n})" if n else ""
        curve = ", ".join(f"{100 * a:.1f}" for _, a in sorted(r["curve"].items()))
        rm = [f"{name} tiny {ev['tiny'][k]:.2f} {'<' if ev['tiny'][k] < ev['sft'][k] else 'NOT <'} sft "
              f"{ev['sft'][k]:.2f}" for k, name in (("eval/helpful_rm", "RM_helpful"), ("eval/safety_rm", "RM_safety"))
              if k in ev.get("tiny", {}) and k in ev.get("sft", {})]
        wall = f"{walls[seed] / 60:.1f} min" if walls.get(seed) else "read from disk"
        gain = (f", stage-1 gain {100 * (acc['reasoning'] - acc['sft']):+.1f}, tax "
                f"{100 * (acc['preference'] - acc['reasoning']):+.1f}" if len(acc) == 3 else "")
        lines.append(f"seed {seed}: accuracy " + " -> ".join(f"{100 * a:.1f}%" for a in acc.values()) + se + gain
                     + f"; stage 1 at its evals: {curve}; {'; '.join(rm)}; wall {wall}")
    return lines


def summary(runs: dict[int, dict]) -> list[str]:
    """Stage 1's gain and stage 2's alignment tax over the seeds, in points."""
    pairs = [(r["eval"]["sft"]["eval/accuracy"], r["eval"]["reasoning"]["eval/accuracy"],
              r["eval"]["preference"]["eval/accuracy"]) for r in runs.values()
             if all(s in r["eval"] for s in ("sft", "reasoning", "preference"))]
    if not pairs:
        return []
    gain = fmt([b - a for a, b, _ in pairs], 100, "")
    tax = fmt([c - b for _, b, c in pairs], 100, "")
    return [f"stage-1 gain (reasoning - sft), points: {gain}", f"alignment tax (preference - reasoning), points: {tax}"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = Path(args.root)
    walls: dict[int, float | None] = {}
    for seed in args.seeds:
        print(f"seed {seed}: running the quickstart in {root / f'seed-{seed}'} ...", flush=True)
        walls[seed] = run_seed(seed, root / f"seed-{seed}", args.experts_impl, args.overrides)
    runs = {seed: read_run(root / f"seed-{seed}") for seed in args.seeds}
    print(f"\nquickstart over seeds {args.seeds} (experts_impl={args.experts_impl}"
          f"{', ' + ' '.join(args.overrides) if args.overrides else ''}): mean ± sd (min–max)\n")
    print("\n".join(table(runs)))
    print()
    print("\n".join(summary(runs) + per_seed(runs, walls)))
    comp = components(runs)
    if comp:
        print("\nstage 2's reward components on held-out prompts (raw means):\n")
        print("\n".join(comp))


if __name__ == "__main__":
    main()
