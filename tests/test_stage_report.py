"""Every stage command's own report (OUTPUT/report.md and its plots, align/report.py `write_stage_report`), the
plots' rules (no panel for an absent or all-zero quantity, a legend naming only what was drawn), and the W&B table
of log_completions samples."""

import json
import math
import sys
import types

import pytest

from align import report
from align.report import plot_accuracy, plot_panels, write_stage_report

from .conftest import DATA, write_jsonl


@pytest.fixture
def drawn(monkeypatch):
    """What each saved figure showed: [{title: {"legend": [...], "ylim": (lo, hi)}}], one dict per figure."""
    figures = []
    save = report._save

    def spy(plt, fig, path, title):
        figures.append({ax.get_title(): {"legend": [t.get_text() for t in ax.get_legend().get_texts()]
                                         if ax.get_legend() else [], "ylim": ax.get_ylim()}
                        for ax in fig.axes if ax.get_visible()})
        save(plt, fig, path, title)
    monkeypatch.setattr(report, "_save", spy)
    return figures


def test_absent_all_nan_zero_and_constant_quantities_get_no_panel_and_no_legend_entry(tmp_path, drawn):
    steps = list(range(1, 11))
    panels = [("loss", [("train", "steps", steps, [10.0 - s for s in steps]),
                        ("held-out", "evals", [], [])], None),                   # never measured
              ("clip fraction", [("per step", "steps", steps, [0.0] * 10)], None),  # 0 throughout
              ("KL", [("per step", "steps", [], [])], None),                     # beta = 0: not logged
              ("entropy", [("per step", "steps", steps, [math.nan] * 10)], None),  # nothing scored
              ("lr", [("schedule", "line", steps, [1e-3] * 5 + [5e-4] * 5)], None),
              ("constant lr", [("schedule", "line", steps, [1e-3] * 10)], None),  # would be a ±5% axis of one value
              ("few steps", [("per step", "steps", [1, 2, 3], [1.0, 2.0, 1.5])], None)]
    assert plot_panels(tmp_path / "t.png", panels, "t") == (True, [("clip fraction", 0.0), ("constant lr", 1e-3)])
    (fig,) = drawn
    assert list(fig) == ["loss", "lr", "few steps"]
    assert fig["loss"]["legend"] == ["train, per step", "rolling mean (2 steps)"]  # no "held-out"
    assert fig["lr"]["legend"] == fig["few steps"]["legend"] == []  # one line (3 points: no rolling mean): no legend
    assert (tmp_path / "t.png").stat().st_size > 5000
    # nothing left to draw: no file, the flat panels still returned
    assert plot_panels(tmp_path / "z.png", panels[1:4], "z") == (False, [("clip fraction", 0.0)])
    assert not (tmp_path / "z.png").exists()


def test_a_zero_accuracy_curve_gets_no_axis_and_a_measured_one_a_0_to_100_axis(tmp_path, drawn):
    assert not plot_accuracy(tmp_path / "a.png", [("s1", [0, 5], [0.0, 0.0])], ("s1 at step 0", 0.0))
    assert not (tmp_path / "a.png").exists() and not drawn
    assert plot_accuracy(tmp_path / "a.png", [("s1", [0, 5], [0.0, 0.25])], None)
    assert drawn[0][""]["ylim"] == (-3, 103)


def test_the_stages_plot_names_only_the_refusal_series_measured(tmp_path, drawn):
    report.plot_stages(tmp_path / "s.png", [("sft", {"eval/accuracy": 0.4, "eval/refusal_rate": 0.5,
                                                     "counts": {"reasoning": 100}}),
                                            ("grpo", {"eval/accuracy": 0.6, "eval/refusal_rate": 0.75})])
    (fig,) = drawn  # no over-refusal measured: no "of benign prompts" entry (one series left: no legend)
    assert list(fig) == ["held-out reasoning accuracy (%)", "refusals (%)"] and fig["refusals (%)"]["legend"] == []


def _metrics(out, rows):
    out.mkdir()
    write_jsonl(out / "metrics.jsonl", rows)


def test_grpo_report_lists_fifths_and_the_quantities_zero_throughout(tmp_path, drawn):
    rows = [{"step": 0, "eval/accuracy": 0.25}]
    rows += [{"step": s, "reward/total": 0.1 * s, "reward/math": 0.1 * s, "reward/format": 0.0,
              "loss/policy": 0.01, "loss/kl": 0.001 * s, "policy/entropy": 2.0 - 0.1 * s, "loss/clip_frac": 0.0,
              "rollout/completion_len": 10.0 + s, "rollout/truncated_frac": 0.0, "reward/zero_std_frac": 0.5,
              "train/grad_norm": 1.0, "train/lr": 1e-5} for s in range(1, 11)]
    rows[-1]["eval/accuracy"] = 0.5
    _metrics(tmp_path / "g", rows)
    text = write_stage_report(tmp_path / "g", "grpo").read_text()
    assert "10 steps logged (steps 1 to 10)" in text
    assert "held-out accuracy: step 0: 25.0%, step 10: 50.0%" in text
    # first fifth = steps 1-2, last fifth = steps 9-10
    assert "| entropy (nats per token) | 1.85 | 1.05 |" in text
    assert "| completion length (sampled tokens) | 11.5 | 19.5 |" in text
    assert "| reward: math | 0.15 | 0.95 |" in text
    assert ("the same at every step (not plotted): policy loss 0.01, clip fraction (% of tokens) 0, truncated "
            "completions (%) 0, groups with zero reward spread (%) 50, gradient norm (before clipping) 1, learning "
            "rate 1e-05, reward: format 0") in text
    assert "| policy loss |" not in text
    assert "![training](training.png)" in text and "![rewards](rewards.png)" in text
    training, rewards = drawn
    assert "clip fraction (% of tokens)" not in training and "truncated completions (%)" not in training
    assert training["held-out accuracy (%)"]["ylim"] == (-3, 103)
    assert list(rewards) == ["reward: math", "reward: total"]
    assert (tmp_path / "g" / "training.png").stat().st_size > 20000


def test_rm_report_without_held_out_pairs_names_no_held_out_series(tmp_path, drawn):
    _metrics(tmp_path / "r", [{"step": s, "loss/bt": 0.7 / s, "rm/train_accuracy": 0.5 + 0.05 * s,
                               "rm/margin": 0.1 * s, "train/grad_norm": 1.0, "train/lr": 1e-3} for s in range(1, 11)])
    text = write_stage_report(tmp_path / "r", "rm").read_text()
    assert "held-out" not in text  # steps 1-2 and 9-10:
    assert "| pair accuracy (%): r(chosen) > r(rejected) (train batch) | 57.5 | 97.5 |" in text
    (training,) = drawn
    assert training["pair accuracy (%): r(chosen) > r(rejected)"]["legend"] == ["train batch, per step",
                                                                                 "rolling mean (2 steps)"]


@pytest.mark.parametrize("command", ["sft", "rm", "grpo"])
def test_each_stage_command_writes_its_report(tiny_dir, tmp_path, capsys, command):
    from align.cli import main

    out = tmp_path / "out"
    data = {"sft": f"train_data=[{DATA}/arith/train.jsonl]",
            "rm": f"train_data=[{DATA}/helpful_pref/heldout.jsonl]",
            "grpo": f"train_data=[{DATA}/arith/rl_prompts.jsonl]"}[command]
    extra = {"sft": ["max_steps=3", "batch_size=4", "max_length=64", "log_every=1"],
             "rm": ["batch_size=36", "max_length=64"],  # 108 pairs: 3 steps
             "grpo": ["steps=3", "group_size=2", "prompts_per_step=2", "sampling.max_new_tokens=4",
                      "rewards=[{name: 'tests.test_grpo_loop:char_count', weight: 1.0}]"]}[command]
    model = f"model.path={tiny_dir}"
    assert main([command, model, f"output_dir={out}", data, "tensorboard=false", *extra]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{\n") + 1:])  # the summary, after the progress lines
    assert summary["report"] == str(out / "report.md")
    text = (out / "report.md").read_text()
    assert text.startswith(f"# `align {command}` report: {out}") and "3 steps logged (steps 1 to 3)" in text
    assert "![training](training.png)" in text and (out / "training.png").stat().st_size > 20000
    if command == "grpo":
        assert "![rewards](rewards.png)" in text and (out / "rewards.png").is_file()


class FakeTable:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data


def test_log_completions_go_to_a_wandb_table_per_logged_step(tmp_path, monkeypatch):
    from align.grpo.samples import write_samples

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Table=FakeTable))
    logged = []
    run = types.SimpleNamespace(log=lambda data, step: logged.append((step, data)))
    rows = [{"step": 3, "prompt_index": 0, "sample": i, "prompt": "1+1?", "completion": c, "reward": r,
             "rewards": {"math": r, "format": 0.5}, "advantage": a, "tokens": 2, "sampled": 1.0, "truncated": False}
            for i, (c, r, a) in enumerate((("2", 1.0, 0.707), ("3", 0.0, -0.707)))]
    write_samples(tmp_path, rows, wandb_run=run)
    (step, data), = logged
    table = data["samples"]
    assert step == 3 and table.columns == ["step", "prompt_index", "sample", "prompt", "completion", "reward",
                                           "advantage", "tokens", "sampled", "truncated", "reward/math",
                                           "reward/format"]
    assert table.data == [[3, 0, 0, "1+1?", "2", 1.0, 0.707, 2, 1.0, False, 1.0, 0.5],
                          [3, 0, 1, "1+1?", "3", 0.0, -0.707, 2, 1.0, False, 0.0, 0.5]]
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2  # the file as before
