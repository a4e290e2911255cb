"""Table-driven tests of the built-in rewards; combination modes; fail / skip policy; factories; remote scorer."""

import asyncio
import concurrent.futures as cf
import http.server
import json
import sys
import threading
import time

import pytest
import torch

from align.grpo.loop import combine_rewards
from rewards import RewardError, RewardSpec, score
from rewards.math import extract_answer, math_reward, same_answer
from rewards.model import HTTPRewardError
from rewards.model import http as http_reward
from rewards.registry import get_reward
from rewards.rules import (language_share, overlong_penalty, repetition_rate, required_tags, tags_score)

MATH_CASES = [  # (completion, gold, expected score)
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("Answer: 1/2", "\\frac{1}{2}", 1.0),
    ("Answer: 0.5", "1/2", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
    ("Answer: 1,024", "1024", 1.0),
    ("Answer: 42", "41", 0.0),
    ("\\boxed{\\pi}", "3.14", 0.0),
    ("I am not sure", "7", 0.0),
    ("first 3, then finally 7", "7", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0),
    ("Answer: -3", "-3", 1.0),
]


@pytest.fixture(scope="module")
def math_fn():
    fn = math_reward(timeout_s=20, workers=1)
    yield fn
    fn.verifier._kill()


@pytest.mark.parametrize("completion,gold,expected", MATH_CASES)
def test_math_reward_table(math_fn, completion, gold, expected):
    assert math_fn(["q"], [completion], answer=[gold]).scores == [expected]


def test_math_reward_works_from_threads(math_fn):
    comps = [c for c, _, _ in MATH_CASES]
    golds = [g for _, g, _ in MATH_CASES]
    with cf.ThreadPoolExecutor(2) as pool:
        out = pool.submit(math_fn, ["q"] * len(comps), comps, answer=golds).result()
    assert out.scores == [e for _, _, e in MATH_CASES]


def test_math_timeout_scores_as_wrong_and_is_counted():
    """A prediction whose check runs past the limit scores 0 as a wrong answer does: an unscored (None) one would get
    advantage 0, above a wrong one, and the policy would be paid to write answers that hang the checker."""
    from .math_worker_helpers import odd_check

    fn = math_reward(timeout_s=1, workers=1)
    fn.verifier.check_fn = odd_check  # the worker's check gets the completion: "hang" never returns
    t = time.time()
    out = fn(["q", "q"], ["hang", "3"], answer=["0.5", "3"])
    assert out.scores == [0.0, 1.0] and out.metrics["timeouts"] == 1.0 and time.time() - t < 15
    fn.close()


def test_math_checker_crash_is_none_and_counted():
    from .math_worker_helpers import odd_check

    fn = math_reward(timeout_s=20, workers=1)
    fn.verifier.check_fn = odd_check
    out = fn(["q"] * 2, ["crash", "\\boxed{\\frac{1}{2}}"], answer=["x", "y"])
    assert out.scores == [None, 0.0] and out.metrics["crashes"] == 1.0
    fn.close()


@pytest.mark.parametrize("answer", ["1e100000000", "-2.5E+99999999", "7" * 300])
def test_unbounded_answers_are_wrong_before_any_arithmetic(math_fn, answer):
    from rewards.math import exact_answer

    math_fn(["q"], ["Answer: 5"], answer=["5"])  # the worker is warm
    t = time.time()
    out = math_fn(["q"], [f"\\boxed{{{answer}}}"], answer=["5"])
    assert out.scores == [0.0] and out.metrics["timeouts"] == 0.0  # refused by the bounds, not by the limit
    assert exact_answer(None, [f"Answer: {answer}"], ["5"]) == [0.0] and time.time() - t < 5


def test_math_cold_start_does_not_count_against_the_timeout():
    """Workers that take over 3 s to start (imports on a busy machine) with a 2 s limit per answer: every answer is
    scored, and the next call reuses the same, warm workers."""
    from . import math_worker_helpers as h

    fn = math_reward(timeout_s=2, workers=2)
    fn.verifier.init_fn = h.slow_start
    cases = [c for c in MATH_CASES if c[0].startswith("\\boxed") or "/" in c[0]]
    comps, golds, expected = ([c[i] for c in cases] for i in range(3))
    try:
        t = time.time()
        out = fn(["q"] * len(comps), comps, answer=golds)
        assert time.time() - t >= 3 and out.scores == expected and out.metrics["timeouts"] == 0.0
        pids = fn.verifier.pool().pids
        assert fn(["q"] * len(comps), comps, answer=golds).scores == expected and fn.verifier.pool().pids == pids
    finally:
        fn.close()
    assert fn.verifier._pool is None


def test_math_hung_check_is_none_counted_and_only_its_worker_is_replaced():
    import os

    from rewards.math import MathVerifier

    from . import math_worker_helpers as h

    v = MathVerifier(timeout_s=1, workers=2, check_fn=h.odd_check)
    try:
        assert v.check([("a", "a")]) == [True]
        before = v.pool().pids
        assert v.check([("a", "a"), ("hang", "x"), ("b", "c"), ("d", "d")]) == [True, None, False, True]
        assert v.check([("e", "e"), ("f", "g"), ("h", "h")]) == [True, False, True]
        after = v.pool().pids
        assert len(after) == 2 and len(set(before) & set(after)) == 1  # the other worker kept going
        assert (v.pool().timeouts, v.pool().crashes, v.pool().restarts) == (1, 0, 1)
        (gone,) = set(before) - set(after)
        with pytest.raises(ProcessLookupError):  # killed and reaped: no zombie
            os.kill(gone, 0)
    finally:
        v.close()
    for pid in after:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_math_two_hung_checks_end_within_twice_the_timeout():
    from rewards.math import MathVerifier

    from . import math_worker_helpers as h

    v = MathVerifier(timeout_s=1.5, workers=2, check_fn=h.odd_check)
    try:
        v.check([("a", "a")])  # the workers are up
        t = time.time()
        assert v.check([("z", "z"), ("hang", "1"), ("ok", "ok"), ("hang", "2")]) == [True, None, True, None]
        assert time.time() - t < 2 * 1.5 and v.pool().timeouts == 2
    finally:
        v.close()


def test_math_crashed_or_raising_check_and_failed_start_up():
    """A check that ends its worker is None (counted, worker replaced); one that raises is False (unparseable); a
    worker that cannot start is an error naming the reward, never a silent None."""
    from rewards.math import MathVerifier

    from . import math_worker_helpers as h

    v = MathVerifier(timeout_s=5, workers=1, check_fn=h.odd_check)
    try:
        assert v.check([("crash", "x"), ("raise", "y"), ("a", "a")]) == [None, False, True]
        assert (v.pool().crashes, v.pool().timeouts) == (1, 0)
    finally:
        v.close()
    bad = MathVerifier(timeout_s=5, workers=1, check_fn=h.odd_check, init_fn=h.fails_to_start)
    with pytest.raises(RuntimeError, match="(?s)reward 'math': a worker process failed to start:.*no module named"):
        bad.check([("a", "a")])
    bad.close()
    slow = MathVerifier(timeout_s=5, workers=1, check_fn=h.odd_check, init_fn=h.slow_start, startup_s=0.5)
    with pytest.raises(RuntimeError, match="reward 'math': a worker process did not start within 0.5 s"):
        slow.check([("a", "a")])
    slow.close()


def test_math_workers_do_not_import_torch():
    """The math workers import math-verify, not torch (rewards/__init__ and align do): ~0.7 s of start-up, not ~3."""
    from rewards.math import MathVerifier
    from rewards.workers import warm_up

    from . import math_worker_helpers as h

    v = MathVerifier(timeout_s=5, workers=1, check_fn=h.torch_imported, init_fn=warm_up)
    try:
        assert v.check([("a", "a")]) == [False]
    finally:
        v.close()


def test_extract_and_compare():
    assert extract_answer("a \\boxed{\\frac{a}{b}} b") == "\\frac{a}{b}"
    assert same_answer("3.0", "3") and not same_answer(None, "3")


RULE_CASES = [  # (function, input, expected)
    (lambda: tags_score("<think>a</think><answer>1</answer>", ["think", "answer"]), None, 1.0),
    (lambda: tags_score("<think>a</think>", ["think", "answer"]), None, 0.5),
    (lambda: tags_score("</think>a<think>", ["think"]), None, 0.0),
    (lambda: tags_score("<think><think>a</think>", ["think"]), None, 0.0),
    (lambda: overlong_penalty(10, 100, 20), None, 0.0),
    (lambda: overlong_penalty(90, 100, 20), None, -0.5),
    (lambda: overlong_penalty(100, 100, 20), None, -1.0),
    (lambda: overlong_penalty(150, 100, 20), None, -1.0),
    (lambda: language_share("hello world", "en"), None, 1.0),
    (lambda: language_share("你好 world", "zh"), None, 2 / 7),
    (lambda: language_share("привет", "ru"), None, 1.0),
    (lambda: language_share("123 !!", "en"), None, 0.0),
    (lambda: repetition_rate("a b c d e f"), None, 0.0),
    (lambda: repetition_rate("a b c a b c a b c"), None, 1 - 3 / 7),
]


@pytest.mark.parametrize("i", range(len(RULE_CASES)))
def test_rule_table(i):
    fn, _, expected = RULE_CASES[i]
    assert fn() == pytest.approx(expected)


def test_rule_rewards_by_name():
    assert get_reward("answer_format")(None, ["x. Answer: 12", "Answer: twelve"]) == [1.0, 0.0]
    assert required_tags(["answer"])(None, ["<answer>1</answer>", "1"]) == [1.0, 0.0]
    assert get_reward("language_consistency")(None, ["bonjour", "你好"], target_language=["en", "zh"]) == [1.0, 1.0]
    assert get_reward("repetition_penalty")(None, ["a b c a b c a b c"])[0] < 0
    with pytest.raises(ValueError, match="unknown language"):
        language_share("x", "tlh")


def test_overlong_factory_through_a_spec():
    spec = RewardSpec("overlong", args={"max_chars": 10, "buffer_chars": 5})
    s = score([spec], ["p"] * 3, ["short", "x" * 8, "x" * 20], {}, ["r"] * 3)
    assert s.components["overlong"].tolist() == [0.0, -0.6000000238418579, -1.0]
    with pytest.raises(KeyError, match="takes settings"):
        RewardSpec("overlong").load()


def test_normalize_mode_balances_component_scales():
    def big(prompts, completions, **_):
        return [1000.0, 0.0, 1000.0, 0.0]

    def small(prompts, completions, **_):
        return [0.0, 1.0, 0.0, 1.0]

    sys.modules[__name__].big, sys.modules[__name__].small = big, small
    specs = [RewardSpec(f"{__name__}:big"), RewardSpec(f"{__name__}:small")]
    summed = score(specs, ["p"] * 4, ["a"] * 4, {}, ["r"] * 4, group_size=2)
    assert summed.total.tolist() == [1000.0, 1.0, 1000.0, 1.0]
    normed = combine_rewards(score(specs, ["p"] * 4, ["a"] * 4, {}, ["r"] * 4, group_size=2), specs, "normalize", 2)
    assert torch.allclose(normed.total, torch.zeros(4), atol=1e-5)  # z-scores cancel: neither dominates
    # the normalised total is centred in every group; the raw weighted sum is logged beside it (report plots it)
    assert normed.metrics()["reward/total"] == pytest.approx(0.0, abs=1e-5)
    assert normed.metrics()["reward/weighted"] == pytest.approx(500.5) and "reward/weighted" not in summed.metrics()


def test_normalize_mode_ignores_none():
    def partial(prompts, completions, **_):
        return [None, 1.0, 3.0, None]

    sys.modules[__name__].partial = partial
    specs = [RewardSpec(f"{__name__}:partial")]
    s = combine_rewards(score(specs, ["p"] * 4, ["a"] * 4, {}, ["r"] * 4, group_size=4), specs, "normalize", 4)
    assert s.total[0].isnan() and s.total[3].isnan()  # no reward scored them: NaN, never 0
    assert s.total[1] < 0 < s.total[2] and s.metrics()[f"reward/{__name__}:partial_applies"] == 0.5


def flaky(prompts, completions, **_):
    if any("boom" in c for c in completions):
        raise ValueError("boom")
    return [1.0] * len(completions)


def test_skip_policy_drops_the_failing_group_and_counts_it():
    spec = RewardSpec(f"{__name__}:flaky")
    comps = ["a", "b", "boom", "c"]
    with pytest.raises(RewardError, match="raised ValueError: boom"):
        score([spec], ["p"] * 4, comps, {}, [f"r{i}" for i in range(4)], group_size=2)
    s = score([spec], ["p"] * 4, comps, {}, [f"r{i}" for i in range(4)], group_size=2, on_error="skip")
    assert s.keep.tolist() == [True, True, False, False] and s.extra["reward/skipped_groups"] == 1.0


async def async_reward(prompts, completions, **_):
    await asyncio.sleep(0)
    return [float(len(c)) for c in completions]


def test_async_reward():
    s = score([RewardSpec(f"{__name__}:async_reward")], ["p", "p"], ["ab", "abc"], {}, ["r", "r"])
    assert s.total.tolist() == [2.0, 3.0]


def test_entry_point_lookup(tmp_path, monkeypatch):
    pkg = tmp_path / "myrewards.py"
    pkg.write_text("def shout(prompts, completions, **_):\n    return [float(c.isupper()) for c in completions]\n")
    dist = tmp_path / "myrewards-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myrewards\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[align.rewards]\nshout = myrewards:shout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward("shout")(None, ["HI", "hi"]) == [1.0, 0.0]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        out = json.dumps({"scores": [float(len(c)) for c in body["completions"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_http_reward_round_trip_and_server_down():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    try:
        assert http_reward(url)(["p", "p"], ["ab", "abcd"], answer=["1", "2"]) == [2.0, 4.0]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(HTTPRewardError, match=r"reward server http://127.0.0.1:\d+/score is unreachable"):
        http_reward(url, timeout_s=1, retries=1, backoff_s=0.01)(["p"], ["a"])
    with pytest.raises(RewardError, match="reward 'remote' raised HTTPRewardError"):
        score([RewardSpec("http", label="remote", args={"url": url, "retries": 0, "timeout_s": 1})], ["p"], ["a"],
              {}, ["r"])


def test_example_plugin_recipe_resolves_both_rewards():
    pytest.importorskip("align_reward_plugin", reason="pip install ./examples/align-reward-plugin")
    from align.config import load_config
    from align.grpo.config import GRPOConfig

    from .conftest import ROOT

    cfg = load_config(GRPOConfig, ROOT / "examples" / "align-reward-plugin" / "grpo-recipe.yaml")
    polite, brief = (spec.load() for spec in cfg.rewards)
    assert polite(None, ["Happy to help!", "No."]) == [1.0, 0.0]
    assert brief(None, ["short answer"]) == [1.0]
    assert cfg.rewards[0].name == "politeness"  # found through the align.rewards entry point, not an import path


def hangs_on_slow(prompts, completions, **_):
    if any("slow" in c for c in completions):
        time.sleep(60)
    return [1.0] * len(completions)


def test_isolated_reward_that_hangs_is_skipped_and_the_others_still_score():
    specs = [RewardSpec(f"{__name__}:hangs_on_slow", isolate=True, timeout_s=3.0), RewardSpec("answer_format")]
    t = time.time()
    s = score(specs, ["p"] * 4, ["Answer: 1", "x", "slow", "Answer: 2"], {}, [f"r{i}" for i in range(4)],
              group_size=2, on_error="skip")
    assert s.keep.tolist() == [True, True, False, False]
    assert s.components["answer_format"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert time.time() - t < 30


def test_math_and_code_skip_missing_rows_of_a_mixed_stage():
    """A stage that mixes math rows (answer) and code rows (tests): each reward scores its own rows, None (does not
    apply) on the others, and asks for no column up front; without skip_missing the column stays required."""
    from rewards.calling import required_columns
    from rewards.registry import get_reward

    math = get_reward("math")(skip_missing=True)
    code = get_reward("code")(skip_missing=True)
    completions = ["The answer is 4.", "```python\ndef f(x):\n    return x + 1\n```"]
    assert math(None, completions, answer=["4", None]).scores == [1.0, None]
    assert code(None, completions, tests=[None, ["assert f(1) == 2"]]).scores == [None, 1.0]
    assert required_columns(math) == [] and required_columns(code) == []
    assert required_columns(get_reward("math")()) == ["answer"]
    math.close()
