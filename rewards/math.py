"""RM_reasoning for math: extract a completion's final answer and compare it with the row's `answer` column.

`exact_answer` compares numbers exactly (fractions, decimals, thousands separators) and other strings literally.
`math` checks equivalence with math-verify (LaTeX, fractions, sets, expressions). math-verify's own timeouts use
SIGALRM, which fails off the main thread (a known failure in other toolkits); here they are switched off and every
check runs in a warm worker process (`rewards.workers`) with a wall-clock limit instead, so the reward works from
threads and processes. The limit counts only the check: the workers start once per reward (math-verify imported and
warmed, no torch), and a check past its limit ends only its own worker, which is replaced.

The policy is optimised against this reward, so nothing in a completion may buy more than a wrong answer scores:
  * an answer is bounded before any arithmetic in this process: longer than MAX_ANSWER_CHARS, or a number with an
    exponent beyond MAX_EXPONENT (`\boxed{1e100000000}` would make `Fraction` build a 10^8-digit integer here, GIL
    held), is wrong without being parsed;
  * a prediction whose check runs past the limit (`\boxed{9^{9^{9^9}}}`) scores 0, as a wrong answer does, and is
    counted in `reward/<name>/timeouts`: an unscored completion would get advantage 0, above a wrong one;
  * only a failure of the checker itself (its worker crashed) scores None (left out of its group, counted in
    `reward/<name>/crashes`).
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

from .answers import extract_answer
from .registry import RewardResult, reward, reward_factory
from .workers import STARTUP_S, WorkerPool, verify_answer, warm_up

MAX_ANSWER_CHARS = 200   # a final answer longer than this is wrong, never parsed
MAX_EXPONENT = 1000      # 1e1000 is a number; beyond that Fraction's cost grows with the exponent, in this process
_EXPONENT = re.compile(r"(?<=[\d.])[eE][+-]?(\d+)")  # a number's exponent: 1e5, 2.5E-3


def bounded(text: str) -> bool:
    """Whether an answer is small enough to parse and compare in the trusted process."""
    if len(text) > MAX_ANSWER_CHARS:
        return False
    return all(len(e) <= len(str(MAX_EXPONENT)) and int(e) <= MAX_EXPONENT for e in _EXPONENT.findall(text))


def _as_number(text: str) -> Fraction | None:
    text = text.replace(",", "").replace("$", "").strip()
    if not bounded(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def same_answer(predicted: str | None, reference: str) -> bool:
    if predicted is None or not bounded(predicted):
        return False
    a, b = _as_number(predicted), _as_number(str(reference))
    if a is not None and b is not None:
        return a == b
    return predicted.strip().lower() == str(reference).strip().lower()


@reward("exact_answer")
def exact_answer(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the extracted final answer equals the row's `answer` (numerically when both are numbers), else 0."""
    return [1.0 if same_answer(extract_answer(c), a) else 0.0 for c, a in zip(completions, answer)]


class MathVerifier:
    """Checks (predicted, gold) pairs in a warm pool of `workers` processes, each check with a `timeout_s` wall-clock
    limit that starts when a ready worker takes it. `check_fn` and `init_fn` must be module-level functions (they
    are sent to the workers); `init_fn` runs once per worker before it takes work (default: warm math-verify when
    `check_fn` is `verify_answer`). Workers start on first use and are reused until `close()`."""

    def __init__(self, timeout_s: float = 5.0, workers: int = 2, check_fn=verify_answer, init_fn=None,
                 startup_s: float = STARTUP_S):
        self.timeout_s = timeout_s
        self.workers = workers
        self.check_fn = check_fn
        self.init_fn = init_fn
        self.startup_s = startup_s
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()

    def pool(self) -> WorkerPool:
        """The worker pool, started (in the background) on first use."""
        with self._lock:
            if self._pool is None:
                init = self.init_fn if self.init_fn is not None else warm_up if self.check_fn is verify_answer else None
                self._pool = WorkerPool(self.check_fn, self.workers, self.timeout_s, init, self.startup_s,
                                        name="reward 'math'")
                self._pool.start()
            return self._pool

    def check_kinds(self, pairs: list[tuple[str, str]]) -> list[tuple[str, object]]:
        """Per pair the worker pool's (kind, value): ("ok", equal), ("raised", message), ("timeout", None) or
        ("died", exit code)."""
        return self.pool().run([(p, g) for p, g in pairs]) if pairs else []

    def check(self, pairs: list[tuple[str, str]]) -> list[bool | None]:
        """True / False per pair (False where the check raised: unparseable), None where it timed out or crashed."""
        return [bool(v) if kind == "ok" else False if kind == "raised" else None for kind, v in self.check_kinds(pairs)]

    def close(self) -> None:
        """End the worker processes (a later check starts fresh ones)."""
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    _kill = close  # the former name


@reward_factory("math")
def math_reward(timeout_s: float = 5.0, workers: int = 2, skip_missing: bool = False):
    """1.0 when the final answer is mathematically equal to `answer` (math-verify), 0.0 if not (an unbounded answer
    or a check past its limit included), None where the checker crashed.
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
            if pred is None or not bounded(pred):
                scores[i] = 0.0
            elif same_answer(pred, gold):
                scores[i] = 1.0
            elif _as_number(pred) is not None and _as_number(str(gold)) is not None:
                scores[i] = 0.0  # two different numbers: no symbolic check needed
            else:
                slow.append(i)
        checked = verifier.check_kinds([(extract_answer(completions[i]), str(answer[i])) for i in slow])
        counts = {"timeouts": 0.0, "crashes": 0.0}
        for i, (kind, value) in zip(slow, checked):
            if kind == "died":  # the checker failed, not the answer: unscored, counted
                counts["crashes"] += 1
                continue
            counts["timeouts"] += kind == "timeout"  # past the limit: as wrong as a wrong answer
            scores[i] = 1.0 if kind == "ok" and value else 0.0
        return RewardResult(scores, counts)

    score.verifier = verifier
    score.required_columns = [] if skip_missing else ["answer"]
    score.close = verifier.close  # ends its worker processes (close_rewards, at the end of a run)
    return score
