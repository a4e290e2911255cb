"""Math rewards: extract a completion's final answer and compare it with the row's `answer` column."""

from __future__ import annotations

import re
from fractions import Fraction

from .registry import reward

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER = re.compile(r"Answer\s*:\s*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer: the last \\boxed{...}, else the last "Answer: ...", else the last number."""
    for pattern in (_BOXED, _ANSWER):
        found = pattern.findall(text)
        if found:
            return found[-1].strip().rstrip(".").strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(text: str) -> Fraction | None:
    text = text.replace(",", "").replace("$", "").strip()
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def same_answer(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    a, b = _as_number(predicted), _as_number(str(reference))
    if a is not None and b is not None:
        return a == b
    return predicted.strip().lower() == str(reference).strip().lower()


@reward("exact_answer")
def exact_answer(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the extracted final answer equals the row's `answer` (numerically when both are numbers), else 0."""
    return [1.0 if same_answer(extract_answer(c), a) else 0.0 for c, a in zip(completions, answer)]


@reward("answer_format")
def answer_format(prompts, completions, **_) -> list[float]:
    """1.0 when the completion ends with a final line "Answer: <number>", else 0."""
    return [1.0 if re.search(r"Answer:\s*-?\d+(?:\.\d+)?\s*$", c) else 0.0 for c in completions]
