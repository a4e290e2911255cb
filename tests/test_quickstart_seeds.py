"""benchmarks/quickstart_seeds.py: the overrides of each seed's run and the mean ± spread table, on run directories
written by hand (no training)."""

import importlib.util
import json

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("quickstart_seeds", ROOT / "benchmarks" / "quickstart_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_seed_seeds_every_stage_and_the_kernel_goes_to_the_policy_stages(bench, tmp_path):
    out = bench.run_overrides(2, tmp_path / "seed-2", "eager", ["stages.reasoning.steps=5"])
    assert out[0] == f"run_dir={tmp_path / 'seed-2'}"
    assert {f"stages.{s}.seed=2" for s in bench.STAGES} <= set(out)
    assert {o for o in out if "experts_impl" in o} == {f"stages.{s}.model.experts_impl=eager"
                                                      for s in ("sft", "reasoning", "preference")}
    assert out[-1] == "stages.reasoning.steps=5"
    assert not [o for o in bench.run_overrides(0, tmp_path, "auto", []) if "experts_impl" in o]


def test_seeds_argument(bench):
    assert bench.parse_args(["--seeds", "3,5"]).seeds == [3, 5]
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "a"])


def test_mean_spread_and_cells(bench):
    assert bench.mean_spread([0.4, 0.5, 0.6]) == pytest.approx((0.5, 0.1, 0.4, 0.6))
    assert bench.fmt([0.4, 0.5, 0.6], 100, "%") == "50.0% ± 10.0 (40.0–60.0)"
    assert bench.fmt([1.0, None], 1, "") == "1.00 ± 0.00 (1.00–1.00)"


def _write_run(root, seed, sft, reasoning, preference):
    for stage, acc in (("tiny", 0.0), ("sft", sft), ("reasoning", reasoning), ("preference", preference)):
        d = root / f"seed-{seed}" / stage
        d.mkdir(parents=True)
        ev = {"eval/accuracy": acc, "eval/helpful_rm": -4.0 if stage == "tiny" else 2.0,
              "eval/safety_rm": 1.0, "counts": {"reasoning": 200}}
        (d / "eval.json").write_text(json.dumps(ev))
    rows = [{"step": 0, "eval/accuracy": sft}, {"step": 150, "eval/accuracy": reasoning}]
    (root / f"seed-{seed}" / "reasoning" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_gain_tax_and_rm_check(bench, tmp_path):
    _write_run(tmp_path, 0, 0.30, 0.55, 0.54)
    _write_run(tmp_path, 1, 0.40, 0.65, 0.66)
    runs = {s: bench.read_run(tmp_path / f"seed-{s}") for s in (0, 1)}
    table = bench.table(runs)
    assert table[2].startswith("| tiny | 0.0% ± 0.0 (0.0–0.0) | -4.00 ± 0.00")
    assert table[4].startswith("| reasoning | 60.0% ± 7.1 (55.0–65.0) |")
    assert bench.summary(runs) == ["stage-1 gain (reasoning - sft), points: 25.0 ± 0.0 (25.0–25.0)",
                                   "alignment tax (preference - reasoning), points: 0.0 ± 1.4 (-1.0–1.0)"]
    line = bench.per_seed(runs, {0: 300.0, 1: None})[0]
    assert line.startswith("seed 0: accuracy 30.0% -> 55.0% -> 54.0% (± 3.5 at most, n=200), stage-1 gain +25.0")
    assert "stage 1 at its evals: 30.0, 55.0; RM_helpful tiny -4.00 < sft 2.00" in line and "wall 5.0 min" in line
