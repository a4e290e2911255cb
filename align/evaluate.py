"""`align eval`: what a checkpoint can do, measured the same way after every stage.

  eval/accuracy          greedy held-out reasoning accuracy: the `answer` column checked by `exact_answer`, or by
                         math-verify (`math`) for MATH-style answers (reasoning_reward; auto: math for a
                         format=math source)
  eval/rule_pass         share of those completions that keep the required final-answer format (`answer_format`)
  eval/pass@1            share of held-out coding problems whose greedy completion passes all of the row's `tests`
                         (the sandboxed `code` reward; HumanEval / MBPP through format=humaneval / mbpp)
  eval/code_tests_passed mean share of each problem's tests passed
  eval/helpful_rm        mean RM_helpful score of greedy answers to held-out helpful prompts
  eval/safety_rm         mean RM_safety score of greedy answers to held-out harmful prompts
  eval/refusal_rate      share of those answers that refuse
  eval/over_refusal_rate share of the answers to the held-out helpful (benign) prompts that refuse
  completions            the greedy answers to the helpful / safety prompts, in row order (what was scored)

Completions are greedy unless `temperature` > 0: then one sampled completion per prompt (seeded by `seed`), with
`top_p`, `top_k`, `min_p`; `repetition_penalty` applies either way (the settings are recorded under `sampling`).

Every source is a data source of `align.run.formats` (a file, a hub dataset id, a sidecar), read and checked before the
model loads. `counts` gives the rows scored per measurement (after `limit`), the code timeouts and, where the
math-verify checker itself crashed, the unscored rows, which are left out of the accuracy. An answer whose check runs
past its limits (counted: reasoning_timeouts), or too large to parse, is wrong, as in training (rewards/math.py); the
math checks run MATH_BATCH completions per call, each call with the reward's batch deadline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch

from .config import ConfigError, option, require
from .rollout.engines import EngineContext, make_engine
from .rollout.protocol import RolloutConfig, SamplingConfig
from .run.allocator import free_device_memory
from .run.data import DataError, PromptRow, load_prompts

_REFUSAL = re.compile(r"\b(sorry|can't|cannot|won't|unable to)\b", re.IGNORECASE)
CODE_SETTINGS = ("wall_s", "cpu_s", "memory_mb", "workers", "isolation")


@dataclasses.dataclass
class EvalConfig:
    reasoning: str = option("", "Held-out reasoning prompts with an `answer` column: a file, a hub dataset "
                                "id[:config[:split]], a sidecar; '#format=gsm8k' / '#format=math' maps GSM8K / MATH "
                                "fields ('' = skip).")
    reasoning_reward: Literal["auto", "exact_answer", "math"] = option(
        "auto", "How reasoning answers are checked: exact_answer (numbers exactly, other strings literally), "
                "math (math-verify equivalence, for LaTeX answers), auto (math for a format=math source, else "
                "exact_answer).")
    code: str = option("", "Held-out coding problems with a `tests` column (e.g. "
                           "'openai/openai_humaneval::test#format=humaneval', 'mbpp:full:test#format=mbpp'): pass@1 of "
                           "greedy completions, scored by the sandboxed code reward ('' = skip).")
    code_reward: dict[str, Any] = option(factory=dict, help="Settings of the code reward for eval.code: wall_s, "
                                                            "cpu_s, memory_mb, workers, isolation.")
    helpful: str = option("", "Held-out helpful prompts, scored by reward_models.helpful ('' = skip).")
    safety: str = option("", "Held-out harmful prompts, scored by reward_models.safety ('' = skip).")
    reward_models: dict[str, str] = option(factory=dict, help="helpful / safety: reward-model directories.")
    max_new_tokens: int = option(64, "Completion length.")
    batch_size: int = option(128, "Sequences per generate call.")
    limit: int = option(0, "Use only the first N prompts of each source (0: all).")
    device: str = option("auto", "Where the policy and reward models run: auto = the GPU when there is one, else "
                                 "cpu; or a torch device (cuda:1).")
    predictions: str = option("", "Also write one JSON row per prompt (source, row id, prompt, completion, answer, "
                                  "score) to this new JSONL file; an existing file is refused, never overwritten.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "The policy's and reward models' dtype: auto = bfloat16 on GPU, float32 on CPU (a recipe evaluates "
                "each stage in the dtype it trained with).")
    temperature: float = option(0.0, "0 = greedy completions (the default); > 0 samples one completion per prompt "
                                     "(seeded by `seed`) with the settings below.")
    top_p: float = option(1.0, "Nucleus sampling mass (1 = off), with temperature > 0.")
    top_k: int = option(0, "Sample among the k most likely tokens (0 = off), with temperature > 0.")
    min_p: float = option(0.0, "Drop tokens below min_p x the top token's probability (0 = off), with temperature > 0.")
    repetition_penalty: float = option(1.0, "Penalise tokens already in the prompt or answer (1 = off; greedy too).")
    seed: int = option(0, "Seed of the sampled completions (temperature > 0).")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
                              batch_size=self.batch_size)

    def validate(self) -> None:
        require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        try:
            self.sampling().validate()
        except ConfigError as e:  # name this config's own keys
            raise ConfigError(str(e).replace("key 'sampling.", "key '")) from None
        require(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)", self.seed)
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        require(self.limit >= 0, "limit", ">= 0 (0: all)", self.limit)
        unknown = sorted(set(self.code_reward) - set(CODE_SETTINGS))
        require(not unknown, "code_reward", f"settings among {', '.join(CODE_SETTINGS)}", unknown)
        try:
            device = eval_device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"key 'device': {e}") from None
        require(device.type != "cuda" or torch.cuda.is_available(), "device", "a device this machine has (no GPU "
                "here)", self.device)
        if self.predictions:
            path = Path(self.predictions).expanduser()
            require(not path.exists(), "predictions", "a new file (align never overwrites one it did not write)",
                    self.predictions)
            require(path.parent.is_dir(), "predictions", "a file in an existing directory", self.predictions)


def _greedy(engine, rows: list[PromptRow], cfg: EvalConfig, sample=None) -> list[str]:
    """One completion per row, greedy unless cfg.temperature > 0; `sample(rows, n, sampling)` instead of one engine
    call where given (a GRPO run's tool loop, so a run with tools is scored with them)."""
    sampling = cfg.sampling()
    if sampling.temperature > 0:
        torch.manual_seed(cfg.seed)
    if sample is not None:
        return sample(rows, 1, sampling).completions
    return engine.generate([r.messages for r in rows], n=1, sampling=sampling).completions


def _column(rows: list[PromptRow], name: str, what: str) -> list:
    """Column `name` of every row; DataError naming the first row that lacks it."""
    values = [r.columns.get(name) for r in rows]
    missing = next((r.columns.get("row") for r, v in zip(rows, values) if v is None), None)
    if missing is not None:
        raise DataError(f"{missing}: no '{name}' column {what}")
    return values


MATH_BATCH = 256  # completions per `math` call in evaluation: each gets the reward's batch deadline, as in training


def answer_scores(reward: str, completions: list[str], answers: list) -> tuple[list[float | None], int]:
    """Per completion 1.0 / 0.0 for the `exact_answer` or `math` reward (the rules of training: an unbounded answer,
    or a check past its limits, is wrong), None where the math checker crashed; and the math checks past a limit."""
    from rewards.math import exact_answer, math_reward

    if reward == "exact_answer":
        return exact_answer(None, completions, answers), 0
    score = math_reward()
    scores: list[float | None] = []
    timeouts = 0
    try:
        for s in range(0, len(completions), MATH_BATCH):
            result = score(None, completions[s:s + MATH_BATCH], [str(a) for a in answers[s:s + MATH_BATCH]])
            scores += result.scores
            timeouts += int(result.metrics["timeouts"])
    finally:
        score.close()
    return scores, timeouts


def _mean(scores: list[float | None]) -> float:
    """Mean of the scored entries (None left out); NaN when none is scored."""
    scored = [s for s in scores if s is not None]
    return sum(scored) / len(scored) if scored else math.nan


def accuracy(engine, rows: list[PromptRow], max_new_tokens: int = 64, batch_size: int = 128,
             reward: str = "exact_answer", sample=None, cfg: EvalConfig | None = None) -> dict:
    """Accuracy and rule pass rate on prompts with an `answer` column: greedy, or as `cfg` samples (`sample`: see
    _greedy)."""
    from rewards.rules import answer_format

    answers = _column(rows, "answer", "to score against")
    completions = _greedy(engine, rows, cfg or EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size), sample)
    scores, timeouts = answer_scores(reward, completions, answers)
    return {"accuracy": _mean(scores), "rule_pass": sum(answer_format(None, completions)) / len(rows),
            "n": len(scores), "unscored": sum(s is None for s in scores), "timeouts": timeouts,
            "examples": completions[:3],
            "completions": completions, "scores": scores}


def code_scorer(settings: dict):
    """The sandboxed code reward with `settings`; ConfigError naming eval.code_reward where it cannot run here."""
    from rewards.code import code_reward

    try:
        return code_reward(**settings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"key 'eval.code_reward': {e}") from None


def pass_at_1(scorer, completions: list[str], tests: list, prelude: list | None = None) -> dict:
    """pass@1 (share of problems whose one completion passes all its tests) and the mean share of tests passed.
    `prelude`: the rows' code the prompt gives (HumanEval's helpers), where they have it."""
    result = scorer(None, completions, tests, prelude=prelude)
    scores = result.scores
    scored = [s for s in scores if s is not None]
    return {"pass@1": sum(s == 1.0 for s in scored) / len(scored) if scored else math.nan,
            "tests_passed": _mean(scores), "n": len(scores), "unscored": len(scores) - len(scored),
            "timeouts": int(result.metrics.get("timeouts", 0)), "scores": scores}


def reasoning_reward(cfg: EvalConfig) -> str:
    """The reward that checks eval.reasoning's answers (auto: math for a format=math source)."""
    from .run.formats import parse_source

    if cfg.reasoning_reward != "auto":
        return cfg.reasoning_reward
    return "math" if parse_source(cfg.reasoning).format == "math" else "exact_answer"


def refusal_rate(completions: list[str]) -> float:
    """Share of the completions that refuse (sorry / can't / cannot / won't / unable to)."""
    return sum(bool(_REFUSAL.search(c)) for c in completions) / len(completions)


def eval_device(name: str) -> torch.device:
    """`auto`: the device training gets (the GPU when there is one); else the named torch device."""
    from .model.precision import training_device

    return training_device() if name == "auto" else torch.device(name)


def _rm_mean(rm_dir: str, rows: list[PromptRow], completions: list[str], cfg: EvalConfig) -> float:
    from rewards.model import ClassifierReward

    rm = ClassifierReward(rm_dir, device=str(eval_device(cfg.device)), dtype=cfg.dtype)
    scores = rm([r.messages for r in rows], completions)
    del rm
    return sum(scores) / len(scores)


def evaluate(model_dir: str, cfg: EvalConfig) -> dict:
    """All configured measurements of the model in `model_dir` (see the module docstring). Every source is read
    and checked (and the code sandbox tried) before the model loads."""
    from .model.policy import ModelConfig, load_policy, load_tokenizer

    def prompts(source: str) -> list[PromptRow]:
        return load_prompts(source)[:cfg.limit or None]

    rows = {kind: prompts(getattr(cfg, kind)) for kind in ("reasoning", "code") if getattr(cfg, kind)}
    rows.update({kind: prompts(getattr(cfg, kind)) for kind in ("helpful", "safety")
                 if getattr(cfg, kind) and cfg.reward_models.get(kind)})
    if "reasoning" in rows:
        _column(rows["reasoning"], "answer", "to score against (eval.reasoning)")
    tests = _column(rows["code"], "tests", "to run (eval.code)") if "code" in rows else []
    scorer = code_scorer(cfg.code_reward) if "code" in rows else None

    tokenizer = load_tokenizer(model_dir)
    device = eval_device(cfg.device)
    policy = load_policy(ModelConfig(path=model_dir, dtype=cfg.dtype), device, trainable=False)
    ctx = EngineContext(model=policy, model_path=model_dir, tokenizer=tokenizer, dtype=next(policy.parameters()).dtype,
                        device=device, seed=0, max_model_len=0)
    engine = make_engine(RolloutConfig(engine="hf"), ctx)  # on the policy just loaded
    out: dict = {"model": model_dir, "device": str(device), "dtype": str(next(policy.parameters()).dtype)[6:]}
    if cfg.sampling().temperature > 0 or cfg.sampling().truncated():
        out["sampling"] = {k: getattr(cfg, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                        "seed")}
    counts = {kind: len(r) for kind, r in rows.items()}
    predictions: list[dict] = []  # --predictions: one row per prompt
    if "reasoning" in rows:
        acc = accuracy(engine, rows["reasoning"], reward=reasoning_reward(cfg), cfg=cfg)
        out.update({"eval/accuracy": acc["accuracy"], "eval/rule_pass": acc["rule_pass"]})
        if acc["unscored"]:
            counts["reasoning_unscored"] = acc["unscored"]
        if acc["timeouts"]:
            counts["reasoning_timeouts"] = acc["timeouts"]
        predictions += _predictions("reasoning", rows["reasoning"], acc["completions"], acc["scores"], "answer")
    if "code" in rows:
        completions = _greedy(engine, rows["code"], cfg)
        code = pass_at_1(scorer, completions, tests, [r.columns.get("prelude") for r in rows["code"]])
        out.update({"eval/pass@1": code["pass@1"], "eval/code_tests_passed": code["tests_passed"]})
        counts["code_timeouts"] = code["timeouts"]
        predictions += _predictions("code", rows["code"], completions, code["scores"], None)
    answers = {kind: _greedy(engine, rows[kind], cfg) for kind in ("helpful", "safety") if kind in rows}
    del engine, policy  # the reward models get the device to themselves
    free_device_memory()
    for kind, completions in answers.items():
        out[f"eval/{kind}_rm"] = _rm_mean(cfg.reward_models[kind], rows[kind], completions, cfg)
        out["eval/refusal_rate" if kind == "safety" else "eval/over_refusal_rate"] = refusal_rate(completions)
        out.setdefault("completions", {})[kind] = completions
        predictions += _predictions(kind, rows[kind], completions, [None] * len(completions), None)
    out["counts"] = counts
    if cfg.predictions:
        with open(Path(cfg.predictions).expanduser(), "x", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        out["predictions"] = cfg.predictions
    return out


def _predictions(source: str, rows: list[PromptRow], completions: list[str], scores: list, answer: str | None):
    """--predictions rows of one source: what was asked, what the model answered, and how it scored."""
    return [{"source": source, "row": r.columns.get("row"), "prompt": r.messages[-1]["content"], "completion": c,
             **({"answer": r.columns.get(answer)} if answer else {}), "score": s}
            for r, c, s in zip(rows, completions, scores)]
