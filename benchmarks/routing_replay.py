"""MoE routing replay on the tiny DeepSeek-V2: replay none / old (R2) / rollout (R3) x balance α, over seeds.

    python benchmarks/routing_replay.py [--model SFT_DIR] [--seeds 0,1,2] [--replays none,old,rollout]
                                        [--alphas 0,0.003] [--steps 30] [--dtype float32|bfloat16]
                                        [--work DIR] [--out rows.json]

The policy is the quickstart's: without `--model`, the `tiny` and `sft` stages of recipes/quickstart.yaml are run
as the recipe gives them (read from it, so they cannot drift apart). Each configuration then runs the recipe's
`reasoning` stage (GRPO stage 1: arithmetic prompts, the `math` reward, G = 8, 16 prompts per step, lr 5e-5,
β 0.04, temperature 1, 48 new tokens) with these changes: μ = 2 inner epochs over each batch (one minibatch), so
the policy moves between the old-policy forward and the second epoch's update forward, which is where routing
replay can matter; `--steps` steps (30 by default, not the recipe's 50: with μ = 2 and the routing metrics a step
costs about 3x the recipe's, and the grid is 18 runs); held-out accuracy only at the start and the end (data/arith/heldout.jsonl,
greedy); no checkpoints but the final model; no TensorBoard; `routing_replay`, `balance_alpha` (the DeepSeek-V2
paper's expert-level α is 0.003), `seed` and `model.dtype` as given. Every run is its own subprocess in its own
run directory under `--work` (a temporary directory by default); a run whose metrics already hold the final
evaluation is read, not re-run.

Measured per run, from its metrics.jsonl: final held-out accuracy; the mean over steps of rollout/kl_sampler (the
engine's sampling log-probs vs the trainer's π_θold); the spread of the importance ratio as the loop logs it (the
per-step mean of π_θ / π_θold over the update's tokens, both epochs): its standard deviation over steps and the
mean over steps of |ratio − 1|; the mean loss/clip_frac; and the means of routing/update_agreement (the policy's own
top-k expert sets after the step's update vs at its start), routing/ref_agreement (after the update vs π_ref) and
routing/sampler_agreement (at the step's start vs the engine while sampling). Prints one markdown table, one row
per (replay, α), each cell the mean over seeds with the min–max ("run s": seconds from a run's start to its last
metrics row); `--out` writes every run's row as JSON.

In fp32 on CPU the transformers engine samples with the trainer's own weights, so the sampler's routes are the
trainer's (sampler_agreement ≈ 1) and R3 ≈ R2; `--dtype bfloat16` makes the cached decode and the full forward
round differently, which is where R3 differs from R2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPLAYS = ("none", "old", "rollout")
PAPER_ALPHA = 0.003      # DeepSeek-V2's expert-level balance factor α1
INNER_EPOCHS = 2         # μ

# column -> (metric in metrics.jsonl, how one run reduces its per-step values)
MEASURES = {
    "kl_sampler": ("rollout/kl_sampler", "mean"),
    "ratio_std": ("policy/ratio", "std"),
    "ratio_dev": ("policy/ratio", "mean_abs_dev"),
    "clip_frac": ("loss/clip_frac", "mean"),
    "update_agreement": ("routing/update_agreement", "mean"),
    "ref_agreement": ("routing/ref_agreement", "mean"),
    "sampler_agreement": ("routing/sampler_agreement", "mean"),
    "train_reward": ("reward/math", "mean"),
}
# table columns: (row key, heading, format)
COLUMNS = [("accuracy", "held-out acc", "pct"), ("kl_sampler", "kl_sampler", "sci"),
           ("ratio_std", "ratio std", "sci"), ("ratio_dev", "mean abs(ratio-1)", "sci"),
           ("clip_frac", "clip frac", "sci"), ("update_agreement", "update agr", "fix"),
           ("ref_agreement", "ref agr", "fix"), ("sampler_agreement", "sampler agr", "fix"),
           ("train_reward", "train reward", "fix"), ("wall_s", "run s", "int")]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One GRPO run of the grid."""
    replay: str
    alpha: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.replay}-a{self.alpha:g}-s{self.seed}"


def _list_of(kind: type, text: str, what: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated {what}, got {text!r}")
    return values


def _seeds(text: str) -> list[int]:
    return _list_of(int, text, "integers like 0,1,2")


def _alphas(text: str) -> list[float]:
    alphas = _list_of(float, text, "numbers like 0,0.003")
    if any(a < 0 or math.isnan(a) for a in alphas):
        raise argparse.ArgumentTypeError(f"balance α must be >= 0, got {text!r}")
    return alphas


def _replays(text: str) -> list[str]:
    replays = _list_of(str, text, f"replay modes out of {','.join(REPLAYS)}")
    unknown = [r for r in replays if r not in REPLAYS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown replay mode {unknown[0]!r}; expected one of {', '.join(REPLAYS)}")
    return replays


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="SFT model directory (default: run the quickstart's tiny and sft "
                   "stages)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated GRPO seeds (default 0,1,2)")
    p.add_argument("--replays", type=_replays, default=list(REPLAYS), help="routing_replay modes (default all)")
    p.add_argument("--alphas", type=_alphas, default=[0.0, PAPER_ALPHA],
                   help=f"balance_alpha values (default 0,{PAPER_ALPHA:g}: off and DeepSeek-V2's)")
    p.add_argument("--steps", type=int, default=30, help="GRPO steps per run (default 30; the recipe has 50)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model.dtype of the runs")
    p.add_argument("--work", default=None, help="directory of the SFT model and the run directories (default: a "
                   "new temporary one); finished runs in it are read, not re-run")
    p.add_argument("--out", default=None, help="write every run's row as JSON to this file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # REPLAY,ALPHA,SEED: run one GRPO run here
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be a positive integer, got {args.steps}")
    if args.one is not None and (args.model is None or args.work is None):
        p.error("--one needs --model and --work")
    return args


def stage_overrides(work: Path, model: str | None = None, spec: RunSpec | None = None, steps: int = 30,
                    dtype: str = "float32") -> list[str]:
    """`load_recipe("quickstart", ...)` overrides: the run directory, and for a GRPO run the changes to stage 1."""
    out = [f"run_dir={work}", "stages.sft.tensorboard=false"]
    if spec is None:
        return out
    return out + [
        f"stages.reasoning.model.path={model}", f"stages.reasoning.model.dtype={dtype}",
        f"stages.reasoning.steps={steps}", f"stages.reasoning.inner_epochs={INNER_EPOCHS}",
        "stages.reasoning.minibatches=1", "stages.reasoning.eval_every=0", "stages.reasoning.save_every=0",
        "stages.reasoning.tensorboard=false", "stages.reasoning.routing_metrics_every=1",
        f"stages.reasoning.routing_replay={spec.replay}", f"stages.reasoning.balance_alpha={spec.alpha}",
        f"stages.reasoning.seed={spec.seed}"]


def quickstart_stages(overrides: list[str]) -> dict:
    """The quickstart recipe's stages by name, validated, with `overrides`."""
    from align.recipe import load_recipe

    _, stages, _, _ = load_recipe("quickstart", overrides)
    return {s.name: s for s in stages}


def sft_model(work: Path) -> str:
    """The quickstart's `tiny` then `sft` stage under work/quickstart (kept if already there); the SFT model's path."""
    from align.sft import train_sft
    from align.tiny import build_tiny

    stages = quickstart_stages(stage_overrides(work / "quickstart"))
    tiny, sft = stages["tiny"], stages["sft"]
    if not (tiny.output / "config.json").is_file():
        build_tiny(tiny.config.output_dir, tiny.config.preset, tiny.config.seed)
    if not (sft.output / "config.json").is_file():
        train_sft(sft.config)
    return str(sft.output)


def run_dir(work: Path, spec: RunSpec) -> Path:
    return work / spec.name


def run_one(args) -> None:
    """The GRPO run named by --one, in this process."""
    from align.grpo.loop import train_grpo

    replay, alpha, seed = args.one.split(",")
    spec = RunSpec(replay, float(alpha), int(seed))
    stage = quickstart_stages(stage_overrides(run_dir(Path(args.work), spec), args.model, spec, args.steps,
                                              args.dtype))["reasoning"]
    train_grpo(stage.config)


def _reduce(values: list[float], how: str) -> float:
    """One run's per-step values reduced; NaN steps (nothing measured) are left out, not counted as 0."""
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return float("nan")
    if how == "mean":
        return statistics.fmean(vals)
    if how == "std":
        return statistics.stdev(vals) if len(vals) > 1 else 0.0
    if how == "mean_abs_dev":
        return statistics.fmean(abs(v - 1.0) for v in vals)
    raise ValueError(f"unknown reduction {how!r}")


def summarise_run(rows: list[dict], steps: int) -> dict | None:
    """A run's figures from its metrics.jsonl rows; None when the final evaluation is not there (unfinished)."""
    final = [r["eval/accuracy"] for r in rows if r["step"] == steps and "eval/accuracy" in r]
    if not final:
        return None
    start = [r["eval/accuracy"] for r in rows if r["step"] == 0 and "eval/accuracy" in r]
    trained = [r for r in rows if r["step"] > 0 and "perf/step_s" in r]
    out = {"accuracy": final[-1], "accuracy_start": start[0] if start else float("nan"),
           "steps_logged": len(trained), "wall_s": rows[-1]["time"]}
    for key, (metric, how) in MEASURES.items():
        out[key] = _reduce([r.get(metric, float("nan")) for r in trained], how)
    return out


def run_grid(args, model: str, work: Path) -> list[dict]:
    """Every (seed, replay, α) run, each in its own subprocess; one row per run."""
    from align.run.metrics import read_metrics

    results = []
    specs = [RunSpec(r, a, s) for s in args.seeds for r in args.replays for a in args.alphas]
    for i, spec in enumerate(specs):
        out_dir = run_dir(work, spec) / "reasoning"
        summary = summarise_run(read_metrics(out_dir), args.steps)
        if summary is None:
            if out_dir.exists():
                raise SystemExit(f"{out_dir} holds an unfinished run; delete it to re-run {spec.name}")
            cmd = [sys.executable, __file__, "--one", f"{spec.replay},{spec.alpha},{spec.seed}", "--model", model,
                   "--work", str(work), "--steps", str(args.steps), "--dtype", args.dtype]
            log = work / f"{spec.name}.log"
            with open(log, "w") as f:
                done = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT)
            if done.returncode:
                raise SystemExit(f"{spec.name} failed (exit {done.returncode}); see {log}")
            summary = summarise_run(read_metrics(out_dir), args.steps)
            if summary is None:
                raise SystemExit(f"{spec.name}: {out_dir}/metrics.jsonl has no eval/accuracy at step {args.steps}")
        row = {**dataclasses.asdict(spec), "dtype": args.dtype, "steps": args.steps, **summary}
        results.append(row)
        print(f"[{i + 1}/{len(specs)}] {spec.name}: held-out {row['accuracy']:.1%}, update agreement "
              f"{row['update_agreement']:.4f}, ratio std {row['ratio_std']:.3g}, {row['wall_s']:.0f} s", flush=True)
    return results


def _fmt(value: float, kind: str) -> str:
    if math.isnan(value):
        return "n/a"
    return {"pct": f"{100 * value:.1f}%", "sci": f"{value:.3g}", "fix": f"{value:.4f}",
            "int": f"{value:.0f}"}[kind]


def cell(values: list[float], kind: str) -> str:
    """mean (min–max) of the numbers among `values`; n/a when there are none."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    mean = _fmt(statistics.fmean(vals), kind)
    return mean if len(vals) == 1 else f"{mean} ({_fmt(min(vals), kind)}–{_fmt(max(vals), kind)})"


def table(rows: list[dict]) -> list[str]:
    """Markdown: one line per (replay, α) in the order first seen, each cell over that configuration's seeds."""
    configs = list(dict.fromkeys((r["replay"], r["alpha"]) for r in rows))
    lines = ["| replay | α | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for replay, alpha in configs:
        runs = [r for r in rows if (r["replay"], r["alpha"]) == (replay, alpha)]
        lines.append(f"| {replay} | {alpha:g} | " + " | ".join(cell([r[k] for r in runs], kind)
                                                             for k, _, kind in COLUMNS) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    if args.one is not None:
        run_one(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="routing_replay_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model = args.model or sft_model(work)
    print(f"SFT model {model}; work {work}; GRPO stage 1 of the quickstart with μ={INNER_EPOCHS}, {args.steps} steps, "
          f"{args.dtype}, seeds {','.join(map(str, args.seeds))}", flush=True)
    rows = run_grid(args, model, work)
    starts = sorted({round(r["accuracy_start"], 4) for r in rows if not math.isnan(r["accuracy_start"])})
    print(f"\nrouting replay x balance α, {args.steps} GRPO steps (μ={INNER_EPOCHS}), {args.dtype}, "
          f"{len(args.seeds)} seeds; held-out accuracy at the start: {', '.join(f'{s:.1%}' for s in starts)}; "
          f"cells: mean over seeds (min–max); total {time.time() - start:.0f} s\n")
    print("\n".join(table(rows)))
    if args.out:
        # NaN (nothing measured) as null: standard JSON
        clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        Path(args.out).write_text(json.dumps(clean, indent=1))


if __name__ == "__main__":
    main()
