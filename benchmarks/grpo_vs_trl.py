"""Side-by-side GRPO step time and peak RSS: align vs TRL's GRPOTrainer, same tiny DeepSeek-V2, same everything.

    pip install -e ".[bench]"          # TRL is a benchmark-only extra
    python benchmarks/grpo_vs_trl.py [--model DIR] [--rounds 3] [--steps 8] [--prompts 8] [--group 8]
                                     [--new-tokens 24] [--engine hf|vllm]

Each runs in its own subprocess (so peak RSS is each one's own) with the same model directory, prompts, G, prompt
count per step, completion length, lr, β, temperature, HF `generate` for rollouts, one update per generation (μ = 1),
fp32 on CPU, two threads, no TensorBoard / W&B logging in either. A step's time is the wall clock between the ends
of consecutive steps (logging included) for both; the first step of each run is warm-up and not timed.

On a shared machine the speed drifts by tens of percent over minutes, so the two run in `--rounds` back-to-back
pairs, alternating which goes first, and each round gives its own time ratio. Prints every round, the median
seconds per step of each, the median of the rounds' ratios, and peak RSS (the largest over the rounds).
`--engine vllm` gives align the vLLM engine instead (not like for like: TRL keeps HF generate; it shows what the
engine is worth). align's trainers tune glibc malloc for themselves (`align/allocator.py`); `--trl-malloc` runs TRL
with the same setting (through MALLOC_* environment variables) to show how much of the gap that accounts for.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "data" / "arith" / "rl_prompts.jsonl"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_align(args) -> dict:
    from align.config import load_config
    from align.grpo.config import GRPOConfig
    from align.grpo.loop import train_grpo
    from align.metrics import read_metrics

    out = Path(tempfile.mkdtemp()) / "align"
    cfg = load_config(GRPOConfig, None, [
        f"model.path={args.model}", f"output_dir={out}", f"train_data=[{PROMPTS}]",
        "rewards=[{name: exact_answer, weight: 1.0}]", f"group_size={args.group}",
        f"prompts_per_step={args.prompts}", f"steps={args.steps}", f"sampling.max_new_tokens={args.new_tokens}",
        "sampling.temperature=1.0", f"lr={args.lr}", f"beta={args.beta}", "save_every=0", "eval_every=0",
        f"micro_batch_size={args.prompts * args.group}", "balance_alpha=0", "tensorboard=false",
        f"rollout.engine={args.engine}"])
    train_grpo(cfg)
    ends = [r["time"] for r in read_metrics(out) if "perf/step_s" in r]          # seconds since start, per step
    times = [b - a for a, b in zip(ends, ends[1:])]                                 # steps 2.. (step 1 is warm-up)
    return {"sec_per_step": statistics.median(times), "steps_timed": len(times), "peak_rss_mb": peak_rss_mb()}


def run_trl(args) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.policy import load_tokenizer
    from rewards.math import exact_answer

    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return exact_answer(prompts, texts, answer)

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.time())

    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.group,
                     num_generations=args.group, max_completion_length=args.new_tokens, learning_rate=args.lr,
                     beta=args.beta, temperature=1.0, max_steps=args.steps, num_iterations=1, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, gradient_accumulation_steps=1,
                     seed=0, lr_scheduler_type="constant", warmup_steps=0, disable_tqdm=True,
                     dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Stamp()])
    start = time.time()
    trainer.train()
    edges = [start] + stamps
    times = [b - a for a, b in zip(edges, edges[1:])][1:]
    return {"sec_per_step": statistics.median(times), "steps_timed": len(times), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="tiny DeepSeek-V2 directory (default: build one)")
    p.add_argument("--rounds", type=int, default=3, help="back-to-back align / TRL pairs")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="align's rollout engine (hf: the like-for-like comparison; TRL always uses HF generate)")
    p.add_argument("--trl-malloc", action="store_true",
                   help="run TRL with align's malloc setting too (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_)")
    p.add_argument("--impl", choices=["align", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(2)
    if args.impl:
        result = run_align(args) if args.impl == "align" else run_trl(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.model is None:
        from align.tiny import build_tiny

        args.model = str(Path(tempfile.mkdtemp()) / "tiny")
        build_tiny(args.model)
    rounds: list[dict] = []
    for r in range(args.rounds):
        order = ("align", "trl") if r % 2 == 0 else ("trl", "align")
        rounds.append({impl: _run(impl, args) for impl in order})
        a, t = rounds[-1]["align"], rounds[-1]["trl"]
        print(f"round {r + 1}: align {a['sec_per_step']:.3f} s/step, TRL {t['sec_per_step']:.3f} s/step, ratio "
              f"{a['sec_per_step'] / t['sec_per_step']:.2f}x; peak RSS {a['peak_rss_mb']:.0f} / "
              f"{t['peak_rss_mb']:.0f} MB", flush=True)
    med = {impl: statistics.median(x[impl]["sec_per_step"] for x in rounds) for impl in ("align", "trl")}
    rss = {impl: max(x[impl]["peak_rss_mb"] for x in rounds) for impl in ("align", "trl")}
    ratio = statistics.median(x["align"]["sec_per_step"] / x["trl"]["sec_per_step"] for x in rounds)
    print(f"GRPO on a tiny DeepSeek-V2, {args.prompts} prompts x G={args.group}, {args.new_tokens} new tokens, "
          f"TRL on HF generate, align on {args.engine}, CPU ({torch.get_num_threads()} threads), {args.rounds} rounds "
          f"x {args.steps - 1} timed steps{', TRL with align malloc setting' if args.trl_malloc else ''}")
    print(f"{'':8}{'s/step (median)':>18}{'peak RSS MB':>14}")
    for impl in ("align", "trl"):
        print(f"{impl:8}{med[impl]:>18.3f}{rss[impl]:>14.0f}")
    print(f"ratio align/trl: time {ratio:.2f}x (median over rounds), peak RSS {rss['align'] / rss['trl']:.2f}x")


def _run(impl: str, args) -> dict:
    cmd = [sys.executable, __file__, "--impl", impl, "--model", args.model, "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--group", str(args.group), "--new-tokens", str(args.new_tokens),
           "--lr", str(args.lr), "--beta", str(args.beta), "--engine", args.engine]
    env = dict(os.environ)
    if impl == "trl" and args.trl_malloc:
        from align.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][7:])


if __name__ == "__main__":
    main()
