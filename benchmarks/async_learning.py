"""Learning with rollouts one step ahead (rollout.max_off_policy_steps = 1) against the synchronous loop (L = 0),
on the quickstart's stage 1 (GRPO on exact arithmetic answers) through a launched vLLM server, over several seeds.
Run it in the vLLM venv of .ci/run, after the quickstart made its SFT model:

    python benchmarks/async_learning.py --sft runs/quickstart/sft/final [--steps 200] [--seeds 0 1 2] [--lags 0 1]

Every run takes the quickstart's stage-1 settings (recipes/quickstart.yaml: G=8, 16 prompts per step, T=0.5, 48 new
tokens, lr 5e-5, beta 0.04, DAPO's zero-std filter), with rollout.engine=vllm_server (launched beside the trainer)
and the given L, and is scored greedily on the 1000 held-out problems of data/arith/eval.jsonl (± 1.6 points at one
standard error) before its first and after its last step. Prints one JSON line per run, then a table of means.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stage1(sft: Path, out: Path, seed: int, lag: int, steps: int) -> dict:
    from align.config import load_config
    from align.grpo.config import GRPOConfig
    from align.grpo.loop import train_grpo
    from align.rollout.server_client import _free_port
    from align.run.metrics import read_metrics

    data = ROOT / "data" / "arith"
    cfg = load_config(GRPOConfig, None, [
        f"model.path={sft}", f"output_dir={out}", f"seed={seed}",
        f"train_data=[{data}/rl_prompts.jsonl, {data}/rl_prompts_more.jsonl]", f"eval_data=[{data}/eval.jsonl]",
        "rewards=[{name: math, weight: 1.0}]", "group_size=8", "prompts_per_step=16", f"steps={steps}",
        "lr=5.0e-5", "beta=0.04", "sampling.temperature=0.5", "sampling.max_new_tokens=48",
        "drop_zero_std_groups=true", "eval_max_new_tokens=48", "micro_batch_size=128", "eval_every=0",
        "save_every=0", "routing_metrics_every=0", "rollout.engine=vllm_server", "rollout.server.launch=true",
        f"rollout.server.port={_free_port()}", f"rollout.max_off_policy_steps={lag}"])
    summary = train_grpo(cfg)
    rows = read_metrics(out)[1:]
    mean = lambda k: statistics.fmean(r[k] for r in rows if k in r) if any(k in r for r in rows) else None  # noqa: E731
    return {"seed": seed, "lag": lag, "steps": steps, "accuracy_start": summary.get("accuracy_start"),
            "accuracy_last": summary.get("accuracy_last"), "step_s": mean("perf/step_s"),
            "reward": mean("reward/total"), "kl_sampler": mean("rollout/kl_sampler"),
            "staleness": mean("rollout/staleness"), "stale_dropped": mean("rollout/stale_dropped")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", type=Path, required=True, help="the quickstart's SFT model (runs/quickstart/sft/final)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lags", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="align-async-"))
    results = []
    for seed in args.seeds:
        for lag in args.lags:
            r = stage1(args.sft, work / f"seed{seed}-L{lag}", seed, lag, args.steps)
            print(json.dumps(r), flush=True)
            results.append(r)
    print(f"\n{'L':>3} {'runs':>4} {'acc start':>10} {'acc end':>8} {'gain':>7} {'step s':>7} {'kl_sampler':>11}")
    for lag in args.lags:
        rs = [r for r in results if r["lag"] == lag]
        gain = [r["accuracy_last"] - r["accuracy_start"] for r in rs]
        print(f"{lag:>3} {len(rs):>4} {statistics.fmean(r['accuracy_start'] for r in rs):>10.1%} "
              f"{statistics.fmean(r['accuracy_last'] for r in rs):>8.1%} {statistics.fmean(gain):>+7.1%} "
              f"{statistics.fmean(r['step_s'] for r in rs):>7.2f} "
              f"{statistics.fmean(r['kl_sampler'] or 0 for r in rs):>11.2e}")


if __name__ == "__main__":
    main()
