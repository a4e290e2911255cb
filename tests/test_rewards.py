"""Reward registry and the checks on reward outputs (named reward, named row)."""

import math

import pytest

from rewards import RewardError, RewardSpec, get_reward, reward, score
from rewards.math import exact_answer, extract_answer


@pytest.mark.parametrize("text,answer", [
    ("3 + 4 = 7. Answer: 7", "7"), ("so \\boxed{12}", "12"), ("the result is 42", "42"),
    ("Answer: 1,024", "1,024"), ("Answer: 3.", "3"), ("no number", None), ("Answer: 5\nAnswer: 6", "6"),
    # nested braces to any depth (a one-level regex cut \frac{\sqrt{3}}{2} short and scored it wrong)
    ("so \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}"), ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"), ("an unclosed \\boxed{3 . Answer: 4", "4"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_exact_answer_reward():
    assert exact_answer(None, ["Answer: 7", "Answer: 07", "Answer: 8", "x"], ["7", "7", "7", "7"]) == [1, 1, 0, 0]


@reward("test_len")
def _length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def test_lookup_by_name_and_module_path():
    assert get_reward("exact_answer") is exact_answer
    assert get_reward("test_len") is _length
    assert get_reward("rewards.math:exact_answer") is exact_answer
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(KeyError, match="cannot import"):
        get_reward("rewards.math:nope")


def test_weighted_total_and_components():
    s = score([RewardSpec("exact_answer", 2.0), RewardSpec("test_len", 0.5)], ["p", "p"], ["Answer: 1", "ab"],
              {"answer": ["1", "1"]}, ["r1", "r2"])
    assert s.total.tolist() == [2.0 + 0.5 * 9, 0.5 * 2]
    assert s.metrics()["reward/exact_answer"] == 0.5


def bad_count(prompts, completions, **_):
    return [1.0]


def nan_reward(prompts, completions, **_):
    return [1.0, math.nan]


def raises(prompts, completions, **_):
    raise RuntimeError("boom")


@pytest.mark.parametrize("fn,message", [
    ("tests.test_rewards:bad_count", "reward 'tests.test_rewards:bad_count' returned 1 scores for 2 completions"),
    ("tests.test_rewards:nan_reward", "reward 'tests.test_rewards:nan_reward' returned nan for data.jsonl:row 2"),
    ("tests.test_rewards:raises", "reward 'tests.test_rewards:raises' raised RuntimeError: boom"),
])
def test_bad_reward_outputs_are_named(fn, message):
    with pytest.raises(RewardError, match=message.replace("(", r"\(")):
        score([RewardSpec(fn)], ["p", "p"], ["a", "b"], {}, ["data.jsonl:row 1", "data.jsonl:row 2"])


def test_missing_column_names_reward_and_row():
    with pytest.raises(RewardError, match="reward 'exact_answer' needs column 'answer', which d.jsonl:row 2"):
        score([RewardSpec("exact_answer")], ["p", "p"], ["a", "b"], {"answer": ["1", None]},
              ["d.jsonl:row 1", "d.jsonl:row 2"])
    with pytest.raises(RewardError, match="needs column 'answer'"):
        score([RewardSpec("exact_answer")], ["p"], ["a"], {}, ["d.jsonl:row 1"])


def test_none_is_excluded_not_zero():
    def partial(prompts, completions, **_):
        return [None, 1.0, 3.0]

    import sys
    sys.modules[__name__].partial = partial
    s = score([RewardSpec(f"{__name__}:partial")], ["p"] * 3, ["a"] * 3, {}, ["r"] * 3)
    assert s.metrics()[f"reward/{__name__}:partial"] == 2.0


def half_judged(prompts, completions, **_):
    """An unparsed judge reply for the first completion of each group of 4, and a whole group it does not apply to."""
    return [None if i % 4 == 0 or i >= 4 else 1.0 for i in range(len(completions))]


def all_ones(prompts, completions, **_):
    return [1.0] * len(completions)


def test_sum_mode_leaves_a_partly_scored_completion_out_of_its_group():
    import sys

    sys.modules[__name__].half_judged, sys.modules[__name__].all_ones = half_judged, all_ones
    specs = [RewardSpec(f"{__name__}:all_ones", label="rule"), RewardSpec(f"{__name__}:half_judged", label="judge")]
    s = score(specs, ["p"] * 8, ["a"] * 8, {}, ["r"] * 8, group_size=4)
    # group 0: the judge scored 3 of 4; the 4th would total 1 where its siblings have 2: no total, not a low one
    assert math.isnan(s.total[0]) and s.total[1:4].tolist() == [2.0, 2.0, 2.0]
    # group 1: the judge does not apply to any of it: every total is the rule's alone
    assert s.total[4:].tolist() == [1.0] * 4
    assert s.metrics()["reward/partially_scored"] == 1.0
    # normalize mode: the missing z is the group's mean (0), so it is not pushed down either
    from align.grpo.loop import combine_rewards

    z = combine_rewards(score(specs, ["p"] * 8, ["a"] * 8, {}, ["r"] * 8, group_size=4), specs, "normalize", 4)
    assert z.total[0] == 0.0 and "reward/partially_scored" not in z.metrics()


def test_skip_records_the_last_error_per_reward():
    def broken(prompts, completions, **_):
        raise ConnectionError("judge at http://127.0.0.1:9 refused the connection")

    import sys
    sys.modules[__name__].broken = broken
    s = score([RewardSpec(f"{__name__}:broken", label="judge")], ["p"] * 4, ["a"] * 4, {}, ["r"] * 4,
              group_size=2, on_error="skip")
    assert not s.keep.any() and s.extra["reward/skipped_groups"] == 2.0
    assert "refused the connection" in s.errors["judge"]


def exits(prompts, completions, **_):
    import sys

    sys.exit(0)


def interrupted(prompts, completions, **_):
    raise KeyboardInterrupt


@pytest.mark.parametrize("isolate", [False, True], ids=["in_process", "isolated"])
def test_a_reward_that_exits_the_process_is_an_error_naming_it(isolate):
    spec = RewardSpec(f"{__name__}:exits", label="grader", isolate=isolate)
    try:
        with pytest.raises(RewardError, match=r"reward 'grader' exited the process \(sys.exit\(0\)\) on the batch from "
                                              r"data.jsonl:row 1"):
            score([spec], ["p", "p"], ["a", "b"], {}, ["data.jsonl:row 1", "data.jsonl:row 2"])
        s = score([spec], ["p"] * 4, ["a"] * 4, {}, ["r"] * 4, group_size=2, on_error="skip")
        assert s.extra["reward/skipped_groups"] == 2.0 and "exited the process" in s.errors["grader"]
    finally:
        from rewards.combine import close_rewards

        close_rewards([spec])


def test_ctrl_c_inside_a_reward_is_not_turned_into_a_reward_error():
    with pytest.raises(KeyboardInterrupt):
        score([RewardSpec(f"{__name__}:interrupted")], ["p"], ["a"], {}, ["r"])


def sleeps(prompts, completions, **_):
    import time

    time.sleep(30)  # past any test's timeout_s; the abandoned thread is a daemon
    return [1.0] * len(completions)


async def never_resolves(prompts, completions, **_):
    import asyncio

    await asyncio.get_running_loop().create_future()


async def resolves(prompts, completions, **_):
    return [0.5] * len(completions)


def test_reward_timeout_has_a_finite_default():
    assert RewardSpec("exact_answer").timeout_s == 300.0


@pytest.mark.parametrize("fn", ["sleeps", "never_resolves"])
def test_a_reward_past_its_timeout_is_an_error_naming_it(fn):
    """In process, sync or async: a call past timeout_s ends within about that time, naming the reward, its limit
    and the batch; with on_error=skip the groups are a counted skip, and the re-scoring shares one more timeout_s."""
    import time

    spec = RewardSpec(f"{__name__}:{fn}", label="grader", timeout_s=1)
    t = time.monotonic()
    with pytest.raises(RewardError, match=r"reward 'grader' timed out after 1 s .*batch from data.jsonl:row 1"):
        score([spec], ["p", "p"], ["a", "b"], {}, ["data.jsonl:row 1", "data.jsonl:row 2"])
    assert time.monotonic() - t < 2.0
    t = time.monotonic()
    s = score([spec, RewardSpec(f"{__name__}:resolves", label="ok")], ["p"] * 6, ["a"] * 6, {}, ["r"] * 6,
              group_size=2, on_error="skip")
    assert time.monotonic() - t < 3.5  # batch 1 s + re-scoring 1 s in all, not 1 s per group
    assert s.extra["reward/skipped_groups"] == 3.0 and "'grader'" in s.errors["grader"]
    assert s.components["ok"].tolist() == [0.5] * 6


def test_an_async_reward_within_its_timeout_scores():
    assert score([RewardSpec(f"{__name__}:resolves", timeout_s=5)], ["p"], ["a"], {}, ["r"]).total.tolist() == [0.5]
