"""The GPU benchmark's code paths, run small on CPU (its figures come from a GPU; this keeps the script working)."""

import importlib.util

from .conftest import ROOT


def test_gpu_benchmark_runs_on_the_tiny_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the measured-kernel cache goes under ~/.cache/align
    spec = importlib.util.spec_from_file_location("gpu_lite", ROOT / "benchmarks" / "gpu_lite.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--preset", "tiny", "--prompts", "2", "--group", "2", "--new-tokens", "6", "--sft-batch", "2",
                      "--sft-seq", "32", "--sft-steps", "1", "--lora-r", "4", "--micro-batch", "3",
                      "--bandwidth", "0.1", "--peak-tflops", "1", "--json", str(tmp_path / "r.json")])
    assert res["experts_kernel"] in ("grouped_mm", "batched_mm", "eager")
    assert res["sft_tokens_s"] > 0 and 0 < res["sft_mfu"] < 1
    for key in ("grpo_generate_s", "grpo_ref_s", "grpo_policy_fwd_bwd_s", "grpo_optimizer_s", "grpo_weight_sync_s"):
        assert res[key] > 0, key
    assert res["gen_tokens_s"] > 0 and res["gen_floor_tokens_s"] > 0
    assert (tmp_path / "r.json").is_file()
