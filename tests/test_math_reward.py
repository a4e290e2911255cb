"""The math rewards under a policy that hunts for reward (issue 37): answers bounded before any arithmetic, all parsing
of a completion in the timed worker, one deadline per batch, a prediction past a limit scoring 0 while a failed
checker scores None (counted), the workers warm before the clock, and the same rules in `align eval`."""

import math
import time

import pytest

from rewards.answers import bounded, number, same_answer
from rewards.math import MAX_COMPLETION_CHARS, MathVerifier, exact_answer, math_reward

from . import math_worker_helpers as h

REFUSED = [  # (answer, why it is refused: hand-checked against the bounds, 10^10000 and exponent 10^4)
    ("1e100000000", "a literal of 10^8 + 1 digits"),
    ("1e10000000", "a literal of 10^7 + 1 digits"),
    ("-2.5E+99999999", "a literal of ~10^8 digits"),
    ("1e-100000000", "Fraction would build a 10^8-digit denominator"),
    ("9^{9^{9^9}}", "the exponent 9^(9^9) has 369,693,100 digits"),
    ("10^{10^{10}}", "the exponent 10^10 is past 10^4"),
    ("10^{100000000}", "the exponent 10^8 is past 10^4"),
    ("10**10**10", "plain-text powers, right-associative: 10^(10^10)"),
    ("10^10^10", "digits after ^ read as one exponent: 10^(10^10)"),
    ("x^{10^{10}}", "an exponent past 10^4 whatever the base"),
    ("2^{-10^{10}}", "a negative exponent builds the same denominator"),
    ("10^{10^{5}}", "100,001 digits"),
    ("(10^9)!", "factorial of 10^9"),
    ("1000000!", "factorial of 10^6 (5 s in sympy)"),
    ("\\Gamma(10^{9})", "Γ(n) = (n-1)!"),
    ("\\binom{10^9}{5 \\cdot 10^8}", "C(n, k) <= 2^n, n = 10^9"),
    ("\\sum_{k=1}^{10^{10}} k", "an upper limit past 10^4"),
    ("7" * 201, "over 200 characters"),
    ("(" * 51 + "1" + ")" * 51, "nested over 50 deep"),
]
ACCEPTED = ["2^{2023}", "1000!", "e^{x^2}", "2^{2^{10}}", "7" * 199, "\\frac{1}{2}", "x^2 + 2x + 1", "\\sqrt[3]{2}",
            "\\{1, 2\\}", "1e9999", "0.5", "-3", "1,024", "\\binom{10}{3}", "3!", "(x+1)^{100}", "10^{1000}", "\\pi",
            "x \\in [2, 5)", "\\Gamma(5)", "2^{2023} - 1", "12^}{", "^^^!!!", "\\frac{1}{0}"]


@pytest.mark.parametrize("answer,why", REFUSED)
def test_unbounded_answers_are_refused_without_being_built(answer, why):
    t = time.perf_counter()
    assert not bounded(answer) and number(answer) is None and not same_answer(answer, answer)
    assert exact_answer(None, [f"\\boxed{{{answer}}}"], [answer]) == [0.0]  # not even equal to itself
    assert time.perf_counter() - t < 0.5


@pytest.mark.parametrize("answer", ACCEPTED)
def test_ordinary_answers_stay_within_the_bounds(answer):
    assert bounded(answer)


def test_numbers_compare_exactly():
    assert number("1,024") == 1024 and number("1e3") == 1000 and number("1/0") is None and number("x") is None
    assert same_answer("0.50", "1/2") and same_answer(" Yes ", "yes") and not same_answer(None, "3")


@pytest.fixture(scope="module")
def real():
    """The math reward as trained with: one real math-verify worker, a 20 s check limit, a 3 s batch deadline."""
    fn = math_reward(timeout_s=20, workers=1, batch_timeout_s=3)
    fn(None, ["Answer: 1"], answer=["1"])  # warm
    yield fn
    fn.close()


@pytest.mark.parametrize("answer", [a for a, _ in REFUSED[:10]])
def test_math_reward_refuses_attacks_in_the_worker_quickly(real, answer):
    t = time.time()
    out = real(None, [f"so \\boxed{{{answer}}}", "\\boxed{\\frac{1}{2}}"], answer=["5", "0.5"])
    assert out.scores == [0.0, 1.0] and out.metrics == {"timeouts": 0.0, "crashes": 0.0}
    assert time.time() - t < 2  # the bounds, not the 20 s limit


def test_completions_are_parsed_only_in_the_worker(real, monkeypatch):
    """The trusted process never reads a completion: with its own parsers broken, the reward scores as before (the
    worker loads rewards/answers.py by path), and an over-long completion is wrong without a worker."""
    def boom(*_):
        raise AssertionError("parsed in the trusted process")

    for name in ("extract_answer", "bounded", "number", "same_answer", "last_boxed"):
        monkeypatch.setattr(f"rewards.answers.{name}", boom)
        monkeypatch.setattr(f"rewards.math.{name}", boom, raising=False)
    out = real(None, ["\\boxed{2\\sqrt{2}}", "Answer: 1,024", "Answer: 7"], answer=["\\sqrt{8}", "1024", "8"])
    assert out.scores == [1.0, 1.0, 0.0]
    fn = math_reward(workers=1)
    assert fn(None, ["7" * (MAX_COMPLETION_CHARS + 1)], answer=["7"]).scores == [0.0] and fn.verifier._pool is None


def test_two_sympy_hangs_end_at_the_batch_deadline(real):
    """Two bounded answers that hang sympy (each > 20 s alone) and a right answer queued behind them, one worker: the
    batch ends at its 3 s deadline, all three 0 (counted), never a None; the next batch gets a warm worker."""
    hangs = ["\\boxed{(x+1)^{10000}}", "\\boxed{(1+\\sqrt{2})^{9999}}"]
    t = time.time()
    out = real(None, [*hangs, "\\boxed{\\frac{1}{2}}"], answer=["5", "5", "0.5"])
    took = time.time() - t
    assert out.scores == [0.0, 0.0, 0.0] and out.metrics == {"timeouts": 3.0, "crashes": 0.0}
    assert 3 <= took < 4.5
    assert real(None, ["\\boxed{\\frac{1}{2}}"], answer=["0.5"]).scores == [1.0]  # waits for the replacement, then
    assert real.verifier.pool().restarts >= 1                                       # is checked on the clock


def test_one_deadline_per_batch():
    """Per-check limit 5 s, batch deadline 1 s, one worker: the hanging check is cut at 1 s, the two behind it are not
    started; with no batch deadline each hang would cost its own 5 s."""
    v = MathVerifier(timeout_s=5, workers=1, check_fn=h.odd_check, batch_timeout_s=1)
    try:
        v.check([("a", "a")])  # warm
        t = time.time()
        kinds = v.check_kinds([("hang", "x"), ("hang", "y"), ("a", "a")])
        assert kinds == [("timeout", None), ("timeout", "not started"), ("timeout", "not started")]
        assert time.time() - t < 2 and v.pool().timeouts == 1
        assert v.check([("b", "b"), ("b", "c")]) == [True, False]  # the replaced worker serves the next batch
    finally:
        v.close()


def test_timeouts_score_zero_and_the_clock_starts_warm():
    """Workers that take 3 s to start, a 1 s check limit and a 1 s batch deadline: the answers are checked (the
    clock starts once the workers are ready); a hanging one scores 0.0, counted."""
    fn = math_reward(timeout_s=1, workers=2, batch_timeout_s=1)
    fn.verifier.check_fn, fn.verifier.init_fn = h.odd_check, h.slow_start
    try:
        t = time.time()
        out = fn(None, ["a", "hang", "b"], answer=["a", "x", "c"])
        assert time.time() - t >= 3
        assert out.scores == [1.0, 0.0, 0.0] and out.metrics == {"timeouts": 1.0, "crashes": 0.0}
    finally:
        fn.close()


def test_a_crashed_pool_is_none_and_counted(tmp_path, monkeypatch):
    """A check whose worker dies, and the batches a replacement worker cannot start for, score None (counted in
    crashes); once workers start again, answers are scored. (A pool that never started is an error:
    test_reward_library.py.)"""
    flag = tmp_path / "no_start"
    monkeypatch.setenv("ALIGN_TEST_NO_START", str(flag))
    fn = math_reward(timeout_s=5, workers=1)
    fn.verifier.check_fn, fn.verifier.init_fn = h.odd_check, h.starts_while_no_flag
    try:
        assert fn(None, ["a"], answer=["a"]).scores == [1.0]
        flag.touch()  # from now on a worker cannot start
        out = fn(None, ["a", "crash", "b"], answer=["a", "x", "b"])
        assert out.scores == [1.0, None, None] and out.metrics == {"timeouts": 0.0, "crashes": 2.0}
        out = fn(None, ["a"], answer=["a"])
        assert out.scores == [None] and out.metrics["crashes"] == 1.0 and fn.verifier.pool().failures == 2
        flag.unlink()
        assert fn(None, ["a", "b"], answer=["a", "c"]).scores == [1.0, 0.0]
    finally:
        fn.close()


def test_a_number_that_escapes_the_bounds_is_a_memory_error_in_the_worker():
    from rewards.workers import MEMORY_BYTES, limit_memory

    v = MathVerifier(timeout_s=20, workers=1, check_fn=h.allocate, init_fn=limit_memory)
    try:
        kinds = v.check_kinds([("0", ""), (str(MEMORY_BYTES >> 30), "")])
        assert kinds == [("ok", False), ("raised", "MemoryError: ")]  # 0 GiB: an empty bytes object
    finally:
        v.close()


def test_math_reward_settings_are_checked():
    for bad in ({"timeout_s": 0}, {"batch_timeout_s": -1}, {"workers": 0}, {"timeout_s": "5"}):
        with pytest.raises(ValueError, match=f"reward 'math': {next(iter(bad))} must be a number > 0"):
            math_reward(**bad)


def test_evaluation_applies_the_same_rules(monkeypatch):
    import align.evaluate as ev

    monkeypatch.setattr(ev, "MATH_BATCH", 2)  # three completions: two calls
    completions = ["\\boxed{1e100000000}", "\\boxed{9^{9^{9^9}}}", "\\boxed{\\frac{1}{2}}"]
    assert ev.answer_scores("math", completions, [5, 5, 0.5]) == ([0.0, 0.0, 1.0], 0)
    assert ev.answer_scores("exact_answer", completions, ["5", "5", "\\frac{1}{2}"]) == ([0.0, 0.0, 1.0], 0)
    assert math.isclose(ev._mean([0.0, None, 1.0]), 0.5)
