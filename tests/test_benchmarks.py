"""The GPU benchmark's code paths, run small on CPU (its figures come from a GPU; this keeps the script working)."""

import importlib.util

import pytest

from .conftest import ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_runs_on_the_tiny_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the measured-kernel cache goes under ~/.cache/align
    bench = _load("gpu_lite")
    res = bench.main(["--preset", "tiny", "--prompts", "2", "--group", "2", "--new-tokens", "6", "--sft-batch", "2",
                      "--sft-seq", "32", "--sft-steps", "1", "--lora-r", "4", "--micro-batch", "3",
                      "--bandwidth", "0.1", "--peak-tflops", "1", "--json", str(tmp_path / "r.json")])
    assert res["experts_kernel"] in ("grouped_mm", "batched_mm", "eager")
    assert res["sft_tokens_s"] > 0 and 0 < res["sft_mfu"] < 1
    for key in ("grpo_generate_s", "grpo_ref_s", "grpo_policy_fwd_bwd_s", "grpo_optimizer_s", "grpo_weight_sync_s"):
        assert res[key] > 0, key
    assert res["gen_tokens_s"] > 0 and res["gen_floor_tokens_s"] > 0
    assert (tmp_path / "r.json").is_file()


def test_grpo_vs_trl_defaults_follow_the_mode():
    bench = _load("grpo_vs_trl")
    speed = bench.parse_args([])
    assert not speed.learning
    assert (speed.steps, speed.prompts, speed.group, speed.new_tokens, speed.lr) == (8, 8, 8, 24, 1e-5)
    learning = bench.parse_args(["--learning"])  # the quickstart's reasoning stage, 40 steps
    assert (learning.steps, learning.prompts, learning.group, learning.new_tokens, learning.lr) == (40, 16, 8, 48, 5e-5)
    assert learning.seeds == [0, 1, 2]
    given = bench.parse_args(["--learning", "--seeds", "3,7", "--steps", "5", "--prompts", "4"])
    assert (given.seeds, given.steps, given.prompts, given.new_tokens) == ([3, 7], 5, 4, 48)


@pytest.mark.parametrize("argv", [["--learning", "--seeds", "0,x"], ["--learning", "--seeds", "1,1"],
                                  ["--learning", "--engine", "vllm"]])
def test_grpo_vs_trl_refuses_bad_learning_arguments(argv, capsys):
    with pytest.raises(SystemExit):
        _load("grpo_vs_trl").parse_args(argv)
    assert "error:" in capsys.readouterr().err
