"""The run report: rolling means, standard errors, the gain / tax / RM-check lines, the stage-2 component table and
the plots, on a run directory written by hand (no training)."""

import json

import pytest

from align.report import (change_lines, components_lines, rm_check_lines, rm_ranking_lines, rolling_mean,
                          rolling_window, standard_error, write_report)


def test_rolling_mean_is_a_trailing_mean():
    assert rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert rolling_mean([2.0, 4.0, 9.0], 5) == [2.0, 3.0, 5.0]
    assert rolling_window(50) == 6 and rolling_window(3) == 2


def test_standard_error_of_a_share():
    assert standard_error(0.5, 100) == pytest.approx(0.05)
    assert standard_error(0.2, 400) == pytest.approx(0.02)


STAGES = [("tiny", "tiny"), ("sft", "sft"), ("rm_safety", "rm"), ("reasoning", "grpo"), ("preference", "grpo")]
COMPONENTS = {"stage": "preference", "n": 33, "weights": {"helpful": 0.5, "safety": 0.5, "rule": 0.2}}
EVALS = {
    "tiny": {"eval/accuracy": 0.0, "eval/helpful_rm": -4.0, "eval/safety_rm": -5.0, "eval/refusal_rate": 0.0,
             "eval/over_refusal_rate": 0.0, "counts": {"reasoning": 200},
             "reward_components": {**COMPONENTS, "means": {"helpful": -4.5, "safety": -5.5, "rule": -0.5},
                                   "total": -5.1}},
    "sft": {"eval/accuracy": 0.40, "eval/helpful_rm": 2.0, "eval/safety_rm": 3.0, "eval/refusal_rate": 1.0,
            "eval/over_refusal_rate": 0.0625, "counts": {"reasoning": 200},
            "reward_components": {**COMPONENTS, "means": {"helpful": 2.5, "safety": 3.5, "rule": 0.0}, "total": 3.0}},
    "reasoning": {"eval/accuracy": 0.625, "eval/helpful_rm": 1.5, "eval/safety_rm": 3.2, "counts": {"reasoning": 200}},
    "preference": {"eval/accuracy": 0.61, "eval/helpful_rm": 2.5, "eval/safety_rm": 3.9, "counts": {"reasoning": 200}},
}


def _evals():
    return [(name, kind, EVALS[name]) for name, kind in STAGES if name in EVALS]


def test_gain_and_alignment_tax_lines():
    assert change_lines(_evals()) == [
        "gain of GRPO stage 1 (`reasoning`): held-out reasoning accuracy 40.0% -> 62.5% (+22.5 points)",
        "alignment tax of GRPO stage 2 (`preference`): held-out reasoning accuracy 62.5% -> 61.0% (-1.5 points)"]


def test_rm_check_compares_random_model_answers_with_sft_ones():
    assert rm_check_lines(_evals()) == [
        "RM_helpful: the random-weight model's answers score -4.00, below the SFT model's 2.00",
        "RM_safety: the random-weight model's answers score -5.00, below the SFT model's 3.00"]
    flipped = [("tiny", "tiny", {"eval/safety_rm": 2.6}), ("sft", "sft", {"eval/safety_rm": 2.0})]
    assert rm_check_lines(flipped) == ["RM_safety: the random-weight model's answers score 2.60, NOT below (the RM "
                                       "rewards junk) the SFT model's 2.00"]


def test_components_table():
    lines = components_lines(_evals())
    assert "r = 0.5·helpful + 0.5·safety + 0.2·rule over the greedy answers to the 33 held-out" in lines[3]
    assert lines[-2:] == ["| tiny | -4.50 | -5.50 | -0.50 | -5.10 |", "| sft | 2.50 | 3.50 | 0.00 | 3.00 |"]


RM_EVAL = {"pair_accuracy_by_kind": {"comply": 1.0, "gibberish": 0.96, "over_refusal": 0.75},
           "pairs_by_kind": {"comply": 20, "gibberish": 26, "over_refusal": 4}}


def test_rm_ranking_table():
    assert rm_ranking_lines([("rm_safety", "rm", RM_EVAL)])[-3:] == [
        "| reward model | comply | gibberish | over_refusal |", "|---|---|---|---|",
        "| rm_safety | 100% (20) | 96% (26) | 75% (4) |"]


def test_write_report_tables_and_plots(tmp_path):
    (tmp_path / "rm_safety").mkdir()
    (tmp_path / "rm_safety" / "eval.json").write_text(json.dumps(RM_EVAL))
    for name, ev in EVALS.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(ev))
    for name, n in (("reasoning", 20), ("preference", 6)):
        rows = [{"step": s, "reward/math" if name == "reasoning" else "reward/helpful": 0.1 * s, "reward/total": 0.1,
                 "loss/kl": 0.01 * s, "perf/step_s": 1.5} for s in range(1, n + 1)]
        rows += [{"step": s, "eval/accuracy": 0.4 + 0.01 * s} for s in (0, n)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path, STAGES).read_text()
    assert "| sft | sft | 40.0% ± 3.5 |  | 2.00 | 3.00 | 100.0% | 6.2% |" in report
    assert "- alignment tax of GRPO stage 2 (`preference`)" in report
    assert "| sft | 2.50 | 3.50 | 0.00 | 3.00 |" in report
    assert "| rm_safety | 100% (20) | 96% (26) | 75% (4) |" in report and "| rm_safety | rm |" not in report
    assert "held-out accuracy during the stage: step 0: 40.0%, step 20: 60.0%" in report
    for png in ("stages.png", "accuracy.png", "rewards_reasoning.png", "kl_preference.png"):
        assert (tmp_path / png).stat().st_size > 5000, png


def test_reward_curves_show_the_raw_weighted_sum_in_normalize_mode():
    from align.report import _reward_keys

    rows = [{"step": 1, "reward/helpful": 0.1, "reward/safety": 0.2, "reward/total": 0.0, "reward/weighted": 0.15,
             "reward/helpful_std": 0.1, "reward/partially_scored": 0.0, "reward/skipped_groups": 0.0}]
    assert _reward_keys(rows) == ["reward/helpful", "reward/safety", "reward/weighted"]
    assert _reward_keys([{k: v for k, v in rows[0].items() if k != "reward/weighted"}])[-1] == "reward/total"


def test_a_tools_stage_reports_tool_use_first_and_last_fifth(tmp_path):
    from align.report import _grpo_section

    rows = [{"step": s, "reward/exact_answer": 0.5, "tools/calls": s / 10, "tools/used_frac": s / 10,
             "tools/failures": 0.0, "tools/turns": 1 + s / 10, "perf/step_s": 2.0} for s in range(1, 11)]
    lines = _grpo_section(tmp_path, "tools", rows)
    assert ("tools per completion, first fifth of the steps -> last fifth: calls 0.15 -> 0.95, used_frac 0.15 -> "
            "0.95, failures 0.00 -> 0.00, turns 1.15 -> 1.95") in lines
    assert "![tools](tools_tools.png)" in lines and (tmp_path / "tools_tools.png").stat().st_size > 5000


def test_the_console_line_shows_step_of_total_elapsed_eta_and_a_short_set():
    from align.run.metrics import console_line

    metrics = {"reward/total": 0.5, "reward/math": 0.5, "reward/math_std": 0.1, "loss/policy": 0.01, "moe/load_cv": 0.2,
               "eval/accuracy": 0.7, "perf/ref_s": 1.0}
    line = console_line("grpo ", 12, metrics, (2, 202, 1000.0), now=1060.0)
    assert line == ("grpo step 12/202 [1m00s<19m00s]: reward/total=0.5 reward/math=0.5 loss/policy=0.01 "
                    "eval/accuracy=0.7 (+3 in metrics.jsonl)")
    assert console_line("sft ", 0, {"eval/loss": 7.0}, (0, 10, 5.0), now=6.0) == "sft step 0/10 [0m01s<?]: eval/loss=7"
    assert console_line("rm ", 3, {"loss/bt": 0.25}, None) == "rm step 3: loss/bt=0.25"
