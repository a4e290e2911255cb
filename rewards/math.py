"""RM_reasoning for math: extract a completion's final answer and compare it with the row's `answer` column.

`exact_answer` compares numbers exactly (fractions, decimals, thousands separators) and other strings literally, in
this process: reading the final answer is one scan, and the answer is bounded (rewards/answers.py) before `Fraction`
builds anything. `math` checks equivalence with math-verify (LaTeX, fractions, sets, expressions). math-verify's own
timeouts use SIGALRM, which fails off the main thread (a known failure in other toolkits); here they are switched off
and the whole check of a completion (`rewards.workers.check_completion`: extracting its final answer, bounding it,
comparing numbers, math-verify) runs in a warm worker process with wall-clock limits instead, so the reward works from
threads and processes. This process only caps a completion's length and hands it over.

The policy is optimised against this reward, so nothing in a completion may buy more than a wrong answer scores:
  * an answer is bounded before any arithmetic: longer than 200 characters, or denoting a number past 10^10000 or an
    exponent past 10^4 (`\\boxed{1e100000000}`, `10^{10^{10}}`, `9^{9^{9^9}}`, `(10^9)!`), it is wrong without being
    built; a completion longer than MAX_COMPLETION_CHARS is wrong without being read;
  * the workers are warm before a batch's clock starts; then each check has `timeout_s` and the batch one deadline,
    `batch_timeout_s`, however many of its answers hang. A prediction cut by either, or that cannot be parsed, scores
    0, as a wrong answer does (counted in `reward/<name>/timeouts`): an unscored completion would get advantage 0,
    above a wrong one;
  * only a failure of the checker itself (a worker that died on a check, a replacement worker that could not start)
    scores None (left out of its group, counted in `reward/<name>/crashes`). Workers that never start are an error.
"""

from __future__ import annotations

import threading

from .answers import MAX_ANSWER_CHARS, bounded, extract_answer, number, same_answer  # noqa: F401 (re-exported)
from .registry import RewardResult, reward, reward_factory
from .workers import STARTUP_S, WorkerPool, check_completion, warm_up

MAX_COMPLETION_CHARS = 1_000_000  # a completion longer than this is wrong, never sent to a worker


@reward("exact_answer")
def exact_answer(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the extracted final answer equals the row's `answer` (numerically when both are numbers), else 0."""
    return [1.0 if same_answer(extract_answer(c), a) else 0.0 for c, a in zip(completions, answer)]


class MathVerifier:
    """Runs checks in a warm pool of `workers` processes: `check_fn(*task)`, by default `check_completion(completion,
    gold)`. A batch starts once every worker is ready; each check then has a `timeout_s` wall-clock limit from when a
    worker takes it, and the batch one deadline `batch_timeout_s` (None: none). `check_fn` and `init_fn` must be
    module-level functions (they are sent to the workers); `init_fn` runs once per worker before it takes work
    (default: `warm_up` when `check_fn` is the math check). Workers start on first use and are reused until
    `close()`."""

    def __init__(self, timeout_s: float = 5.0, workers: int = 2, check_fn=check_completion, init_fn=None,
                 startup_s: float = STARTUP_S, batch_timeout_s: float | None = None):
        self.timeout_s = timeout_s
        self.batch_timeout_s = batch_timeout_s
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
                init = self.init_fn if self.init_fn is not None else warm_up if self.check_fn is check_completion \
                    else None
                self._pool = WorkerPool(self.check_fn, self.workers, self.timeout_s, init, self.startup_s,
                                        name="reward 'math'", batch_timeout_s=self.batch_timeout_s)
                self._pool.start()
            return self._pool

    def check_kinds(self, tasks: list[tuple]) -> list[tuple[str, object]]:
        """Per task the worker pool's (kind, value): ("ok", result), ("raised", message), ("timeout", ...),
        ("died", exit code) or ("failed", message); see WorkerPool."""
        return self.pool().run(list(tasks)) if tasks else []

    def check(self, tasks: list[tuple]) -> list[bool | None]:
        """True / False per task (False where the check raised), None where it timed out, died or failed."""
        return [bool(v) if kind == "ok" else False if kind == "raised" else None for kind, v in self.check_kinds(tasks)]

    def close(self) -> None:
        """End the worker processes (a later check starts fresh ones)."""
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    _kill = close  # the former name


@reward_factory("math")
def math_reward(timeout_s: float = 5.0, workers: int = 2, skip_missing: bool = False, batch_timeout_s: float = 30.0):
    """1.0 when the final answer is mathematically equal to `answer` (math-verify), 0.0 if not (an unbounded answer,
    or a check past `timeout_s` or past the batch's `batch_timeout_s`, included), None where the checker crashed.
    `skip_missing`: rows without an `answer` (e.g. the code rows of a mixed stage) score None instead of being
    refused before the run."""
    for key, value in (("timeout_s", timeout_s), ("batch_timeout_s", batch_timeout_s), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"reward 'math': {key} must be a number > 0, got {value!r}")
    verifier = MathVerifier(timeout_s, int(workers), batch_timeout_s=batch_timeout_s)

    def score(prompts, completions, answer=None, **_) -> RewardResult:
        answer = [None] * len(completions) if answer is None else answer
        scores: list[float | None] = [None] * len(completions)
        sent: list[int] = []
        for i, (c, gold) in enumerate(zip(completions, answer)):
            if gold is None:  # only with skip_missing: the column check refuses such rows otherwise
                continue
            if len(c) > MAX_COMPLETION_CHARS:
                scores[i] = 0.0
            else:
                sent.append(i)
        checked = verifier.check_kinds([(completions[i], str(answer[i])) for i in sent])
        counts = {"timeouts": 0.0, "crashes": 0.0}
        for i, (kind, value) in zip(sent, checked):
            if kind in ("died", "failed"):  # the checker failed, not the answer: unscored, counted
                counts["crashes"] += 1
                continue
            counts["timeouts"] += kind == "timeout"  # past a limit: as wrong as a wrong answer
            scores[i] = 1.0 if kind == "ok" and value else 0.0
        return RewardResult(scores, counts)

    score.verifier = verifier
    score.required_columns = [] if skip_missing else ["answer"]
    score.close = verifier.close  # ends its worker processes (close_rewards, at the end of a run)
    return score
