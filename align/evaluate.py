"""Held-out accuracy: greedy completions of prompts that carry an `answer` column, scored by `exact_answer`."""

from __future__ import annotations

from pathlib import Path

from .data import PromptRow, load_prompts
from .resources import data_dir
from .rollout.hf import HFEngine
from .rollout.protocol import SamplingConfig


def accuracy(engine, rows: list[PromptRow], max_new_tokens: int = 64, batch_size: int = 128) -> dict:
    from rewards.math import exact_answer

    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = engine.generate([r.messages for r in rows], n=1, sampling=sampling)
    answers = [r.columns.get("answer") for r in rows]
    if any(a is None for a in answers):
        missing = next(r.columns.get("row") for r, a in zip(rows, answers) if a is None)
        raise ValueError(f"{missing}: no 'answer' column to score against")
    scores = exact_answer(None, out.completions, answers)
    return {"accuracy": sum(scores) / len(scores), "n": len(scores),
            "truncated": out.truncated.float().mean().item(), "examples": out.completions[:3]}


def evaluate_arithmetic(model_dir: str, data: str | None = None, max_new_tokens: int = 64, limit: int = 0) -> dict:
    """Accuracy of the model in `model_dir` on the bundled held-out arithmetic (or `data`)."""
    from .policy import ModelConfig, load_policy, load_tokenizer

    path = Path(data) if data else data_dir() / "arith" / "heldout.jsonl"
    rows = load_prompts(path)[: limit or None]
    tokenizer = load_tokenizer(model_dir)
    model = load_policy(ModelConfig(path=model_dir), "cpu", trainable=False)
    result = accuracy(HFEngine(model, tokenizer), rows, max_new_tokens)
    return {"model": model_dir, "data": str(path), **result}
