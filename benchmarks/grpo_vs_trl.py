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
engine is worth). align's trainers tune glibc malloc for themselves (`align/run/allocator.py`); `--trl-malloc` runs TRL
with the same setting (through MALLOC_* environment variables) to show how much of the gap that accounts for.

Learning mode: does align's GRPO learn as well as TRL's from the same start?

    python benchmarks/grpo_vs_trl.py --learning [--model SFT_DIR] [--seeds 0,1,2] [--steps 40] [--prompts 16]
                                     [--group 8] [--new-tokens 48] [--lr 5e-5]

Without `--model` it builds the tiny DeepSeek-V2 and SFTs it with align's SFT on the quickstart's `sft` stage
settings (recipes/quickstart.yaml); `--model` takes an existing SFT model directory instead. Then, for each seed,
align's GRPO and TRL's GRPOTrainer each train a copy of that model in their own subprocess, matched on: the prompts
(data/arith/rl_prompts.jsonl, chat-templated by both), the reward (`rewards.math.exact_answer`), G, prompts per
step, steps, a constant lr (align warmup_steps=0, min_lr_ratio=1.0; TRL `constant`, no warmup), AdamW betas
(0.9, 0.95), no weight decay, gradient clipping at 1.0, β (k3 KL to the SFT model), clip ε 0.2, μ = 1, group-std
advantage scaling, the per-completion length-normalised loss (align sequence_mean; TRL loss_type="grpo"), no
truncated-completion masking, no MoE balance loss, sampling at temperature 1.0 with no top-k / top-p, the
completion length, fp32 on CPU, two threads, and the seed value. align's truncated importance weight is switched off
(tis_cap=0; TRL has none on HF generate). Not matched: the order prompts are drawn in and the sampling random
streams (each library's own), and TRL's advantage epsilon (1e-4 vs align's 1e-6). Both final models are saved
and scored the same way, in this process: greedy held-out exact-answer accuracy on data/arith/heldout.jsonl with
align's evaluator (`align.evaluate.accuracy` over an `HFEngine`). Prints one line per seed, then the mean accuracy
of each, its spread, the SFT model's starting accuracy and the mean training reward of each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
PROMPTS = DATA / "arith" / "rl_prompts.jsonl"
HELDOUT = DATA / "arith" / "heldout.jsonl"
SFT_DATA = [DATA / "arith" / "train.jsonl", DATA / "helpful" / "train.jsonl", DATA / "safety" / "train.jsonl"]
# defaults per mode; learning: the quickstart's reasoning stage (recipes/quickstart.yaml), 40 steps
SPEED_DEFAULTS = {"steps": 8, "prompts": 8, "group": 8, "new_tokens": 24, "lr": 1e-5}
LEARNING_DEFAULTS = {"steps": 40, "prompts": 16, "group": 8, "new_tokens": 48, "lr": 5e-5}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _align_overrides(args, out: Path) -> list[str]:
    """The GRPO settings align gets in both modes (TRL gets the same ones in `_trl_trainer`)."""
    return [
        f"model.path={args.model}", f"output_dir={out}", f"train_data=[{PROMPTS}]",
        "rewards=[{name: exact_answer, weight: 1.0}]", f"group_size={args.group}",
        f"prompts_per_step={args.prompts}", f"steps={args.steps}", f"sampling.max_new_tokens={args.new_tokens}",
        "sampling.temperature=1.0", f"lr={args.lr}", f"beta={args.beta}", "save_every=0", "eval_every=0",
        f"micro_batch_size={args.prompts * args.group}", "balance_alpha=0", "tensorboard=false"]


def run_align(args) -> dict:
    from align.config import load_config
    from align.grpo.config import GRPOConfig
    from align.grpo.loop import train_grpo
    from align.run.metrics import read_metrics

    out = Path(tempfile.mkdtemp()) / "align"
    cfg = load_config(GRPOConfig, None, _align_overrides(args, out) + [f"rollout.engine={args.engine}"])
    train_grpo(cfg)
    ends = [r["time"] for r in read_metrics(out) if "perf/step_s" in r]          # seconds since start, per step
    times = [b - a for a, b in zip(ends, ends[1:])]                                 # steps 2.. (step 1 is warm-up)
    return {"sec_per_step": statistics.median(times), "steps_timed": len(times), "peak_rss_mb": peak_rss_mb()}


def exact_answer_reward(prompts, completions, answer, **_):
    """`rewards.math.exact_answer` on TRL's completions (conversational ones are lists of messages)."""
    from rewards.math import exact_answer

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return exact_answer(prompts, texts, answer)


def _trl_trainer(args, callbacks: list, **settings):
    """TRL's GRPOTrainer on the same model, prompts, reward and GRPO settings as `_align_overrides`; `settings`
    override or add GRPOConfig fields."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from align.model.policy import load_tokenizer

    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    base = {"output_dir": tempfile.mkdtemp(), "per_device_train_batch_size": args.prompts * args.group,
            "num_generations": args.group, "max_completion_length": args.new_tokens, "learning_rate": args.lr,
            "beta": args.beta, "temperature": 1.0, "max_steps": args.steps, "num_iterations": 1, "logging_steps": 1,
            "save_strategy": "no", "report_to": [], "use_cpu": True, "bf16": False, "gradient_accumulation_steps": 1,
            "seed": 0, "lr_scheduler_type": "constant", "warmup_steps": 0, "disable_tqdm": True,
            "dataloader_num_workers": 0}
    cfg = GRPOConfig(**{**base, **settings})
    return GRPOTrainer(model=model, reward_funcs=exact_answer_reward, args=cfg, train_dataset=ds,
                       processing_class=tok, callbacks=callbacks)


def run_trl(args) -> dict:
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.time())

    trainer = _trl_trainer(args, [Stamp()])
    start = time.time()
    trainer.train()
    edges = [start] + stamps
    times = [b - a for a, b in zip(edges, edges[1:])][1:]
    return {"sec_per_step": statistics.median(times), "steps_timed": len(times), "peak_rss_mb": peak_rss_mb()}


def _mean(values: list[float]) -> float:
    """Mean of the values that are numbers (a step with nothing scored logs NaN: left out, not counted as 0)."""
    scored = [v for v in values if not math.isnan(v)]
    return statistics.fmean(scored) if scored else float("nan")


def run_align_learning(args) -> dict:
    """One seed of align's GRPO from the SFT model (constant lr, no truncated-IS weight); model in args.out/final."""
    from align.config import load_config
    from align.grpo.config import GRPOConfig
    from align.grpo.loop import train_grpo
    from align.run.metrics import read_metrics

    start = time.time()
    cfg = load_config(GRPOConfig, None, _align_overrides(args, Path(args.out)) + [
        "rollout.engine=hf", "warmup_steps=0", "min_lr_ratio=1.0", "inner_epochs=1", "minibatches=1",
        "policy_loss=clip", "aggregation=sequence_mean", "scale_rewards=group", "tis_cap=0", f"seed={args.seed}"])
    summary = train_grpo(cfg)
    rewards = [r["reward/exact_answer"] for r in read_metrics(args.out) if "reward/exact_answer" in r]
    return {"final": summary["final"], "mean_reward": _mean(rewards), "steps_logged": len(rewards),
            "wall_s": time.time() - start}


def run_trl_learning(args) -> dict:
    """One seed of TRL's GRPO matched to `run_align_learning`; the model is saved to args.out/final."""
    start = time.time()
    trainer = _trl_trainer(args, [], output_dir=args.out, seed=args.seed, loss_type="grpo", scale_rewards="group",
                           epsilon=0.2, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
                           top_k=0, top_p=1.0, mask_truncated_completions=False, router_aux_loss_coef=0.0)
    trainer.train()
    final = Path(args.out) / "final"
    trainer.save_model(str(final))
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"final": str(final), "mean_reward": _mean(rewards), "steps_logged": len(rewards),
            "wall_s": time.time() - start}


def sft_model(work: Path) -> str:
    """The tiny DeepSeek-V2 SFT'd by align on the quickstart's `sft` stage settings; returns its final/ directory."""
    from align.config import load_config
    from align.sft import SFTConfig, train_sft
    from align.tiny import build_tiny

    build_tiny(work / "tiny")  # the quickstart's tiny stage: preset tiny, seed 0
    cfg = load_config(SFTConfig, None, [
        f"model.path={work / 'tiny'}", f"output_dir={work / 'sft'}",
        f"train_data=[{', '.join(str(p) for p in SFT_DATA)}]", f"eval_data=[{HELDOUT}]", "max_length=128",
        "epochs=6", "batch_size=16", "lr=2.0e-3", "min_lr_ratio=0.2", "warmup_ratio=0.05", "eval_every=200",
        "save_every=0", "log_every=100", "tensorboard=false"])
    return train_sft(cfg)["final"]


def heldout_accuracy(model_dir: str, max_new_tokens: int) -> float:
    """Greedy exact-answer accuracy on data/arith/heldout.jsonl, as `align eval` measures it."""
    from align.run.data import load_prompts
    from align.evaluate import accuracy
    from align.model.policy import ModelConfig, load_policy, load_tokenizer
    from align.rollout.hf import HFEngine

    engine = HFEngine(load_policy(ModelConfig(path=model_dir), "cpu", trainable=False), load_tokenizer(model_dir))
    return accuracy(engine, load_prompts(HELDOUT), max_new_tokens)["accuracy"]


def compare_learning(args) -> None:
    work = Path(tempfile.mkdtemp())
    args.model = args.model or sft_model(work)
    start_acc = heldout_accuracy(args.model, args.new_tokens)
    print(f"SFT model {args.model}: held-out accuracy {start_acc:.1%}; GRPO {args.steps} steps of {args.prompts} "
          f"prompts x G={args.group}, {args.new_tokens} new tokens, lr {args.lr:g} (constant), beta {args.beta:g}, "
          f"HF generate for both, seeds {','.join(map(str, args.seeds))}", flush=True)
    runs: dict[str, list[dict]] = {"align": [], "trl": []}
    for seed in args.seeds:
        for impl, done in runs.items():
            run = _run(impl, args, ["--learning", "--seed", str(seed), "--out", str(work / f"{impl}-{seed}")])
            run["accuracy"] = heldout_accuracy(run["final"], args.new_tokens)
            done.append(run)
        a, t = runs["align"][-1], runs["trl"][-1]
        print(f"seed {seed}: align {a['accuracy']:.1%} (mean train reward {a['mean_reward']:.3f}, {a['wall_s']:.0f} s)"
              f", TRL {t['accuracy']:.1%} (mean train reward {t['mean_reward']:.3f}, {t['wall_s']:.0f} s)", flush=True)
    acc = {impl: [r["accuracy"] for r in rs] for impl, rs in runs.items()}
    reward = {impl: statistics.fmean(r["mean_reward"] for r in rs) for impl, rs in runs.items()}
    print(f"learning: align {statistics.fmean(acc['align']):.1%} vs TRL {statistics.fmean(acc['trl']):.1%} held-out "
          f"accuracy after {args.steps} steps ({len(args.seeds)} seeds)")
    print(f"spread (min-max): align {min(acc['align']):.1%}-{max(acc['align']):.1%}, TRL {min(acc['trl']):.1%}-"
          f"{max(acc['trl']):.1%}; SFT start {start_acc:.1%}; mean training reward: align {reward['align']:.3f}, "
          f"TRL {reward['trl']:.3f}")


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="speed: tiny DeepSeek-V2 directory (default: build one); "
                   "learning: SFT model directory (default: build the tiny one and SFT it)")
    p.add_argument("--rounds", type=int, default=3, help="speed: back-to-back align / TRL pairs")
    p.add_argument("--steps", type=int, help="GRPO steps per run (speed: 8, learning: 40)")
    p.add_argument("--prompts", type=int, help="prompts per step (speed: 8, learning: 16)")
    p.add_argument("--group", type=int, help="G, completions per prompt (8)")
    p.add_argument("--new-tokens", type=int, help="completion length (speed: 24, learning: 48)")
    p.add_argument("--lr", type=float, help="learning rate, constant (speed: 1e-5, learning: 5e-5)")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="align's rollout engine (hf: the like-for-like comparison; TRL always uses HF generate)")
    p.add_argument("--trl-malloc", action="store_true",
                   help="run TRL with align's malloc setting too (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_)")
    p.add_argument("--learning", action="store_true",
                   help="compare held-out accuracy after GRPO from the same SFT model instead of speed")
    p.add_argument("--seeds", type=_seed_list, default=[0, 1, 2],
                   help="learning: comma-separated seeds, one align and one TRL run each (default 0,1,2)")
    p.add_argument("--impl", choices=["align", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.learning and args.engine != "hf":
        p.error("--learning compares both on HF generate; --engine vllm is for the speed comparison")
    for key, value in (LEARNING_DEFAULTS if args.learning else SPEED_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(2)
    if args.impl:
        runners = {("align", False): run_align, ("trl", False): run_trl,
                   ("align", True): run_align_learning, ("trl", True): run_trl_learning}
        result = runners[args.impl, args.learning](args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.learning:
        compare_learning(args)
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


def _run(impl: str, args, extra: list[str] = ()) -> dict:
    """One run of `impl` in its own subprocess (`extra`: more arguments for it); returns its RESULT line."""
    cmd = [sys.executable, __file__, "--impl", impl, "--model", args.model, "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--group", str(args.group), "--new-tokens", str(args.new_tokens),
           "--lr", str(args.lr), "--beta", str(args.beta), "--engine", args.engine, *extra]
    env = dict(os.environ)
    if impl == "trl" and args.trl_malloc:
        from align.run.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][7:])


if __name__ == "__main__":
    main()
