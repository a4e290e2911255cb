"""benchmarks/routing_replay.py: its arguments, the GRPO settings it gives the quickstart's stage 1, and how it
reduces a run's metrics (hand-made rows; the runs themselves are the benchmark, not a test)."""

import importlib.util
import math
import sys

import pytest

from .conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("routing_replay", ROOT / "benchmarks" / "routing_replay.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the module is being executed
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_issue_grid():
    args = _bench().parse_args([])
    assert (args.seeds, args.replays, args.alphas) == ([0, 1, 2], ["none", "old", "rollout"], [0.0, 0.003])
    assert (args.steps, args.dtype, args.model, args.out) == (30, "float32", None, None)
    given = _bench().parse_args(["--seeds", "4", "--replays", "old", "--alphas", "0.01", "--dtype", "bfloat16"])
    assert (given.seeds, given.replays, given.alphas, given.dtype) == ([4], ["old"], [0.01], "bfloat16")


@pytest.mark.parametrize("argv", [["--seeds", "0,x"], ["--seeds", "1,1"], ["--replays", "old,r3"],
                                  ["--alphas", "-0.1"], ["--steps", "0"], ["--dtype", "float16"],
                                  ["--one", "old,0,0"]])
def test_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit):
        _bench().parse_args(argv)
    assert "error:" in capsys.readouterr().err


def test_stage_one_gets_mu_2_and_the_run_settings(tmp_path):
    bench = _bench()
    spec = bench.RunSpec("old", 0.003, 2)
    (tmp_path / "sft").mkdir()  # the recipe checks that the model directory exists
    stages = bench.quickstart_stages(bench.stage_overrides(tmp_path, str(tmp_path / "sft"), spec, 7, "bfloat16"))
    cfg = stages["reasoning"].config
    assert (cfg.inner_epochs, cfg.minibatches, cfg.steps, cfg.eval_every, cfg.save_every) == (2, 1, 7, 0, 0)
    assert (cfg.routing_replay, cfg.balance_alpha, cfg.seed, cfg.model.dtype) == ("old", 0.003, 2, "bfloat16")
    assert cfg.model.path == str(tmp_path / "sft") and cfg.output_dir == str(tmp_path / "reasoning")
    # the rest is the recipe's stage 1
    assert (cfg.group_size, cfg.prompts_per_step, cfg.lr, cfg.beta) == (8, 16, 5e-5, 0.04)
    assert (cfg.sampling.temperature, cfg.sampling.max_new_tokens, cfg.micro_batch_size) == (0.5, 48, 128)
    assert cfg.drop_zero_std_groups
    assert [r.name for r in cfg.rewards] == ["math"] and cfg.eval_data[0].endswith("arith/heldout.jsonl")


def test_a_run_is_reduced_over_its_steps():
    bench = _bench()
    rows = [{"step": 0, "time": 1.0, "eval/accuracy": 0.25},
            {"step": 1, "time": 5.0, "perf/step_s": 4.0, "policy/ratio": 1.0, "loss/clip_frac": 0.0,
             "rollout/kl_sampler": 2e-9, "routing/update_agreement": 1.0, "reward/math": 0.5},
            {"step": 2, "time": 9.0, "perf/step_s": 4.0, "policy/ratio": 1.02, "loss/clip_frac": 0.1,
             "rollout/kl_sampler": float("nan"), "routing/update_agreement": 0.9, "reward/math": 0.7},
            {"step": 2, "time": 12.5, "eval/accuracy": 0.5}]
    run = bench.summarise_run(rows, steps=2)
    assert (run["accuracy"], run["accuracy_start"], run["steps_logged"], run["wall_s"]) == (0.5, 0.25, 2, 12.5)
    assert run["ratio_std"] == pytest.approx(0.02 / math.sqrt(2))   # stdev of 1.00, 1.02
    assert run["ratio_dev"] == pytest.approx(0.01)                  # mean of |0|, |0.02|
    assert run["clip_frac"] == pytest.approx(0.05) and run["update_agreement"] == pytest.approx(0.95)
    assert run["kl_sampler"] == 2e-9                                # the NaN step is left out, not a 0
    assert math.isnan(run["ref_agreement"]) and run["train_reward"] == pytest.approx(0.6)
    assert bench.summarise_run(rows[:-1], steps=2) is None         # no final evaluation: unfinished


def test_table_cells_are_mean_and_range_over_seeds():
    bench = _bench()
    assert bench.cell([0.2, 0.4, float("nan")], "pct") == "30.0% (20.0%–40.0%)"
    assert bench.cell([0.9], "fix") == "0.9000" and bench.cell([float("nan")], "sci") == "n/a"
    row = {k: 0.5 for k, _, _ in bench.COLUMNS}
    lines = bench.table([{**row, "replay": "old", "alpha": 0.003}, {**row, "replay": "none", "alpha": 0.0}])
    assert lines[0].startswith("| replay | α | held-out acc |") and len(lines) == 4
    assert lines[2].startswith("| old | 0.003 | 50.0% |") and lines[3].startswith("| none | 0 |")
