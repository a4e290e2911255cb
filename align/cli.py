"""The `align` command line.

    align tiny OUT_DIR [--preset tiny|tiny-q-lora]      build a tiny DeepSeek-V2 + tokenizer offline
    align sft  [RECIPE.yaml] [key=value ...]            supervised fine-tuning
    align grpo [RECIPE.yaml] [key=value ...]            GRPO
    align rm   [RECIPE.yaml] [key=value ...]            reward model (Bradley-Terry) on preference pairs
    align eval MODEL_DIR [--reasoning S --code S --helpful S --safety S --rm-helpful D --rm-safety D --limit N]
    align run RECIPE [key=value ...] [--check]          a chain of stages from a recipe (`align run quickstart`)
    align serve MODEL_DIR [--tensor-parallel-size N ...] a vLLM server for rollout.engine=vllm_server
    align doctor [--server URL]                         versions, CPU / GPU features, fast paths, a vLLM server

`align sft --help-config` lists every key with its default and meaning. Bad input (unknown keys, unreadable files,
malformed rows) is reported as `error: <place>: <what>` with exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .config import build_config, describe, load_config
from .errors import AlignError, ConfigError
from .run.metrics import strict_json
from .run.storage import FULL, READ_ONLY


def _stage(cls, train, args) -> int:
    if args.help_config:
        print(f"{cls.__name__} keys:\n" + "\n".join(describe(cls)))
        return 0
    recipe, overrides = None, list(args.overrides)
    if overrides and "=" not in overrides[0]:
        recipe = overrides.pop(0)
    cfg = load_config(cls, recipe, overrides)
    print(strict_json(train(cfg), indent=1, default=str))
    return 0


def _cmd_tiny(args) -> int:
    from .config import check_seed, check_writable_dir, directory_path
    from .tiny import build_tiny

    out_dir = directory_path(args.out_dir, "OUT_DIR")
    check_writable_dir(out_dir, "OUT_DIR")
    check_seed(args.seed, "--seed")
    print(json.dumps(build_tiny(out_dir, preset=args.preset, seed=args.seed), indent=1))
    return 0


def _cmd_sft(args) -> int:
    from .sft import SFTConfig, train_sft

    return _stage(SFTConfig, train_sft, args)


def _cmd_grpo(args) -> int:
    from .grpo.loop import GRPOConfig, train_grpo

    return _stage(GRPOConfig, train_grpo, args)


def _cmd_rm(args) -> int:
    from .rm import RMConfig, train_rm

    return _stage(RMConfig, train_rm, args)


def _cmd_eval(args) -> int:
    from .evaluate import EvalConfig, evaluate
    from .model.policy import check_model_dir
    from .resources import data_dir

    check_model_dir(args.model, policy=True)
    for path in (args.rm_helpful, args.rm_safety):
        if path:
            check_model_dir(path)
    cfg = build_config(EvalConfig, {
        "reasoning": args.reasoning or str(data_dir() / "arith" / "heldout.jsonl"),
        "reasoning_reward": args.reasoning_reward, "code": args.code or "",
        "helpful": args.helpful or str(data_dir() / "helpful" / "heldout.jsonl"),
        "safety": args.safety or str(data_dir() / "safety" / "heldout.jsonl"),
        "reward_models": {k: v for k, v in (("helpful", args.rm_helpful), ("safety", args.rm_safety)) if v},
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "limit": args.limit,
        "device": args.device, "dtype": args.dtype, "predictions": args.predictions or "",
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty, "seed": args.seed},
        "<command line>")
    print(strict_json(evaluate(args.model, cfg), indent=1))
    return 0


def _cmd_run(args) -> int:
    from .recipe import claim_run_dir, load_recipe, plan_reruns, run_recipe

    if args.check:
        from .probe import probe_recipe

        run_dir, stages, _, _ = load_recipe(args.recipe, list(args.overrides))
        claim_run_dir(run_dir, stages, write=False)  # refuses a directory holding files align did not write
        plan = plan_reruns(run_dir, stages, args.rerun_from)  # refuses finished stages whose settings changed
        todo = [s.name for s in stages if s.name in plan.rerun or not plan.finished(s)]
        findings = probe_recipe([s for s in stages if s.name in todo])  # models, hub cache, judge URLs
        for level, key, message in findings:
            print(f"{level}: key '{key}': {message}", file=sys.stderr)
        errors, warnings = (sum(f[0] == level for f in findings) for level in ("error", "warning"))
        verdict = (f"not runnable here ({errors} error{'s' * (errors != 1)} above)" if errors else
                   f"valid, with {warnings} warning{'s' * (warnings != 1)} above" if warnings else "valid")
        print(f"{args.recipe}: {verdict}; stages {', '.join(s.name for s in stages)} -> {run_dir}; to run: "
              f"{', '.join(todo) or 'none'}")
        return 2 if errors else 0
    print(strict_json(run_recipe(args.recipe, list(args.overrides), rerun_from=args.rerun_from), indent=1,
                      default=str))
    return 0


def _cmd_doctor(args) -> int:
    from .doctor import main as doctor

    return doctor(args.server)


def _cmd_serve(args, vllm_args: list[str]) -> int:
    """Replace this process by the vLLM server align's vllm_server engine talks to (or print its command)."""
    import shlex

    import torch

    from .model.policy import check_model_dir, model_dir, resolve_dtype
    from .rollout.vllm import choose_attention_backend, vllm_missing
    from .rollout.vllm_server import server_command

    check_model_dir(args.model, policy=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, torch.device(device))
    cmd, env = server_command(
        str(model_dir(args.model)), dtype=dtype, max_model_len=args.max_model_len, port=args.port, host=args.host,
        tensor_parallel_size=args.tensor_parallel_size, seed=args.seed, on_cpu=device == "cpu",
        attention_backend=choose_attention_backend(args.attention_backend, device, dtype),
        record_routes=args.enable_return_routed_experts, extra_args=tuple(vllm_args))
    line = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(cmd)
    if args.print:
        print(line)
        return 0
    missing = vllm_missing()
    if missing:
        raise ConfigError(f"align serve: {missing}")
    print(f"align serve: {line}", flush=True)
    os.execve(cmd[0], cmd, {**os.environ, **env})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align", description="DeepSeek-V2 alignment: SFT and GRPO.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny", help="build a tiny DeepSeek-V2 with random weights and a trained tokenizer")
    t.add_argument("out_dir")
    t.add_argument("--preset", default="tiny", choices=["tiny", "tiny-q-lora"])
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_tiny)

    for name, func, text in (("sft", _cmd_sft, "supervised fine-tuning"), ("grpo", _cmd_grpo, "GRPO"),
                             ("rm", _cmd_rm, "train a Bradley-Terry reward model on chosen / rejected pairs")):
        s = sub.add_parser(name, help=text)
        s.add_argument("overrides", nargs="*", help="an optional recipe YAML, then key=value overrides")
        s.add_argument("--help-config", action="store_true", help="list every config key")
        s.set_defaults(func=func)

    e = sub.add_parser("eval", help="held-out accuracy, rule pass rate, code pass@1 and RM scores of a model directory")
    e.add_argument("model")
    e.add_argument("--reasoning", help="prompts with an `answer` column: a file or a hub dataset "
                                       "id[:config[:split]], e.g. openai/gsm8k:main:test#format=gsm8k (default: "
                                       "bundled held-out arithmetic)")
    e.add_argument("--reasoning-reward", default="auto", choices=["auto", "exact_answer", "math"],
                   help="answer check (auto: math-verify for a #format=math source, else exact_answer)")
    e.add_argument("--code", help="coding problems with a `tests` column for pass@1, e.g. "
                                  "openai/openai_humaneval::test#format=humaneval (default: none)")
    e.add_argument("--helpful", help="helpful prompts (default: bundled held-out)")
    e.add_argument("--safety", help="harmful prompts (default: bundled held-out)")
    e.add_argument("--rm-helpful", help="RM_helpful directory (helpful score skipped without it)")
    e.add_argument("--rm-safety", help="RM_safety directory (safety score skipped without it)")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=128, help="sequences per generate call")
    e.add_argument("--limit", type=int, default=0, help="only the first N prompts of each source (0: all)")
    e.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ...")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the policy's and reward models' dtype (auto: bfloat16 on GPU, float32 on CPU)")
    e.add_argument("--predictions", help="write every prompt's completion, answer and score to this new JSONL file")
    e.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: one sampled completion "
                                                                  "per prompt, seeded by --seed")
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--top-k", type=int, default=0, help="0: off")
    e.add_argument("--min-p", type=float, default=0.0, help="0: off")
    e.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off (applies to greedy too)")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("run", help="run a recipe's stages (resumes where it stopped)")
    r.add_argument("recipe", help="a recipe file or a bundled recipe name (quickstart, deepseek-v2-lite, ...)")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.sft.epochs=2")
    r.add_argument("--check", action="store_true", help="validate the recipe, say which stages would run, and stop")
    r.add_argument("--from", dest="rerun_from", metavar="STAGE",
                   help="rerun STAGE and every stage after it (their earlier outputs are moved to "
                        "RUN_DIR/.replaced/), e.g. after changing STAGE's settings")
    r.set_defaults(func=_cmd_run)

    v = sub.add_parser("serve", help="start a vLLM server for rollout.engine=vllm_server (vLLM with align's weight "
                                     "receiver; flags after the known ones go to vLLM)")
    v.add_argument("model", help="the policy's model directory (the server's architecture and first weights)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--host", default="0.0.0.0", help="the address to listen on (0.0.0.0: every interface)")
    v.add_argument("--tensor-parallel-size", type=int, default=1)
    v.add_argument("--max-model-len", type=int, default=4096, help="longest prompt + completion the runs need")
    v.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPU, float32 on CPU (the training run's model.dtype)")
    v.add_argument("--attention-backend", default="auto", help="as rollout.attention_backend")
    v.add_argument("--enable-return-routed-experts", action="store_true", help="return MoE routes (R3)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--print", action="store_true", help="print the command instead of running it")
    v.set_defaults(func=_cmd_serve)

    d = sub.add_parser("doctor", help="versions, CPU / GPU features and active fast paths (paste into bug reports)")
    d.add_argument("--server", help="also report a vLLM server at this URL (reachable, version, workers, align's "
                                    "extension)")
    d.set_defaults(func=_cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command != "serve":  # only serve passes unknown flags on (to vLLM)
        build_parser().parse_args(argv)
    try:
        return _run(args, rest)
    except KeyboardInterrupt:  # Ctrl-C outside a stage's steps (loading, saving, eval), or a second one within them
        print(f"\n{_interrupted(args.command)}", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(args, rest: list[str]) -> int:
    """The command's exit status; a refusal or a stop on a signal is printed as one line."""
    from rewards.combine import RewardError  # imports torch: a Ctrl-C during it is main's to report

    try:
        return args.func(args, rest) if args.command == "serve" else args.func(args)
    except (AlignError, RewardError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)  # 2, or 128 + N after a stop on signal N (align/run/stop.py)
    except OSError as e:  # a write the disk refused outside the guarded ones (align/run/storage.py): one line
        if e.errno not in (*FULL, *READ_ONLY):
            raise
        print(f"error: cannot write {e.filename or 'a file'}: {e.strerror}; what was saved before stays, and the "
              "same command resumes once the disk is fixed", file=sys.stderr)
        return 2


def _interrupted(command: str) -> str:
    """The one line a Ctrl-C that ended `align COMMAND` prints, instead of the traceback of wherever it landed."""
    if command in ("sft", "grpo", "rm", "run"):
        return (f"align {command}: interrupted (Ctrl-C); the work since the last checkpoint is lost, and the same "
                "command resumes from that checkpoint, if there is one")
    return f"align {command}: interrupted (Ctrl-C)"


if __name__ == "__main__":
    sys.exit(main())
