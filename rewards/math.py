"""RM_reasoning for math: extract a completion's final answer and compare it with the row's `answer` column.

`exact_answer` compares numbers exactly (fractions, decimals, thousands separators) and other strings literally.
`math` checks equivalence with math-verify (LaTeX, fractions, sets, expressions). math-verify's own timeouts use
SIGALRM, which fails off the main thread (a known failure in other toolkits); here they are switched off and every
check runs in a worker process with a wall-clock limit instead, so the reward works from threads and processes. A
check that times out scores None (left out, never counted as 0) and is counted in the metric
`reward/<name>/timeouts`.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import re
from fractions import Fraction

from align.formats import last_boxed

from .registry import RewardResult, reward, reward_factory

_ANSWER = re.compile(r"Answer\s*:\s*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer: the last \\boxed{...} (braces nested to any depth), else the last "Answer: ...", else the
    last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.rstrip(".").strip()
    found = _ANSWER.findall(text)
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


def verify_answer(predicted: str, gold: str) -> bool:
    """math-verify equivalence without its signal-based timeouts (safe off the main thread)."""
    from math_verify import parse, verify

    def wrap(s: str) -> str:
        return s if "$" in s or "\\boxed" in s else f"${s}$"

    gold_parsed = parse(wrap(gold), parsing_timeout=None)
    pred_parsed = parse(wrap(predicted), parsing_timeout=None)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class MathVerifier:
    """Checks (predicted, gold) pairs in worker processes, each with a wall-clock limit."""

    def __init__(self, timeout_s: float = 5.0, workers: int = 2, check_fn=verify_answer):
        self.timeout_s = timeout_s
        self.workers = workers
        self.check_fn = check_fn  # a module-level function (it is sent to worker processes)
        self._pool: cf.ProcessPoolExecutor | None = None

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self._pool

    def _kill(self) -> None:  # a stuck check cannot be cancelled: end the workers, start fresh next time
        from .isolation import kill_pool

        kill_pool(self._pool)
        self._pool = None

    def check(self, pairs: list[tuple[str, str]]) -> list[bool | None]:
        """True / False per pair, None where the check timed out or crashed."""
        futures = [self._executor().submit(self.check_fn, p, g) for p, g in pairs]
        out: list[bool | None] = []
        stuck = False
        for fut in futures:
            try:
                out.append(fut.result(timeout=None if stuck else self.timeout_s))
            except (cf.TimeoutError, cf.process.BrokenProcessPool):
                out.append(None)
                stuck = True
            except Exception:  # unparseable input: not equal
                out.append(False)
        if stuck:
            self._kill()
        return out


@reward_factory("math")
def math_reward(timeout_s: float = 5.0, workers: int = 2, skip_missing: bool = False):
    """1.0 when the final answer is mathematically equal to `answer` (math-verify), 0.0 if not, None on timeout.
    `skip_missing`: rows without an `answer` (e.g. the code rows of a mixed stage) score None instead of being
    refused before the run."""
    verifier = MathVerifier(timeout_s, workers)

    def score(prompts, completions, answer=None, **_) -> RewardResult:
        answer = [None] * len(completions) if answer is None else answer
        scores: list[float | None] = [None] * len(completions)
        slow: list[int] = []
        for i, (c, gold) in enumerate(zip(completions, answer)):
            pred = extract_answer(c)
            if gold is None:  # only with skip_missing: the column check refuses such rows otherwise
                continue
            if pred is None:
                scores[i] = 0.0
            elif same_answer(pred, gold):
                scores[i] = 1.0
            elif _as_number(pred) is not None and _as_number(str(gold)) is not None:
                scores[i] = 0.0  # two different numbers: no symbolic check needed
            else:
                slow.append(i)
        checked = verifier.check([(extract_answer(completions[i]), str(answer[i])) for i in slow]) if slow else []
        timeouts = 0
        for i, ok in zip(slow, checked):
            if ok is None:
                timeouts += 1
            else:
                scores[i] = 1.0 if ok else 0.0
        return RewardResult(scores, {"timeouts": float(timeouts)})

    score.verifier = verifier
    score.required_columns = [] if skip_missing else ["answer"]
    score.close = verifier._kill  # ends its worker processes (close_rewards, at the end of a run)
    return score
