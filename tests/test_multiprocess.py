"""SFT as 2 processes (gloo, on CPU) equals 1 process with the same global batch: same losses step by step."""

import json
import os
import subprocess
import sys

import pytest

from align.run.metrics import read_metrics

from .conftest import DATA, ROOT

ARGS = [f"train_data=[{DATA}/arith/train.jsonl]", "max_steps=4", "lr=2e-3", "save_every=2", "tensorboard=false",
        "balance_alpha=0"]


def test_two_process_sft_equals_one_process(tiny_dir, tmp_path):
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "align", "sft", f"model.path={tiny_dir}",
                          f"output_dir={tmp_path}/one", "batch_size=8", *ARGS], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "align", "sft", f"model.path={tiny_dir}", f"output_dir={tmp_path}/two",
                          "batch_size=4", *ARGS], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "4 steps of 8" in two.stdout  # two processes x 4 rows = the single process's global batch of 8
    a = [r["loss/sft"] for r in read_metrics(tmp_path / "one")]
    b = [r["loss/sft"] for r in read_metrics(tmp_path / "two")]
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "step-0000004" / "trainer_state.pt").is_file()
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()



@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant"])
def test_two_process_grpo_update_equals_one_process(tiny_dir, tmp_path, aggregation):
    """The same 8 rollouts as 1 process x 8 or 2 processes x 4 (gloo): the global loss denominators and the
    gradient averaging make the SGD step identical (token_mean has unequal token counts per process; constant
    divides by sampling.max_new_tokens, not by each process's own completion width)."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = {}
    for n in (1, 2):
        out = tmp_path / f"{n}.json"
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                              "--master_port", str(29520 + n), str(ROOT / "tests" / "grpo_update_worker.py"),
                              str(tiny_dir), str(out), aggregation], capture_output=True, text=True, env=env,
                             timeout=300, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
        results[n] = json.loads(out.read_text())
    assert results[1]["grad_norm"] > 1e-3
    assert results[2]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-5)
    for name, value in results[1]["params"].items():
        assert results[2]["params"][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name


def test_grpo_runs_under_accelerate_launch_with_the_fsdp2_config(tiny_dir, tmp_path):
    """`accelerate launch` with the shipped FSDP2 config starts 2 processes; on CPU accelerate runs them as
    data-parallel over gloo (FSDP sharding itself needs GPUs)."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(["accelerate", "launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp2.yaml"),
                          "--num_processes", "2", "--main_process_port", "29519", "-m", "align", "grpo",
                          f"model.path={tiny_dir}", f"output_dir={tmp_path}/two",
                          f"train_data=[{DATA}/arith/rl_prompts.jsonl]", "rewards=[{name: exact_answer}]",
                          "group_size=4", "prompts_per_step=4", "steps=2", "sampling.max_new_tokens=6",
                          "save_every=1", "tensorboard=false", f"eval_data=[{DATA}/arith/heldout.jsonl]"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 steps of 4 x G=4 over 2 processes" in two.stdout
    rows = read_metrics(tmp_path / "two")
    assert [m["step"] for m in rows] == [0, 1, 2] and "eval/accuracy" in rows[-1]
    assert rows[1]["policy/ratio"] == 1.0
    assert (tmp_path / "two" / "checkpoints" / "step-0000002" / "trainer_state.pt").is_file()
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_fsdp2_sharded_policy_gives_the_same_logprobs_gradients_and_sync_weights(tiny_dir, tmp_path, variant):
    """FSDP2 sharding (2 processes, gloo): the LM-head capture behind chunked log-probs works on a sharded model,
    gradients equal the unsharded ones, and the weights sent to vLLM are gathered whole (LoRA merged)."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531" if variant == "full" else "29532", str(ROOT / "tests" / "fsdp2_worker.py"),
                          str(tiny_dir), str(out), variant], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["logprob_gap"] < 1e-5 and r["grad_gap"] < 1e-5 and r["weight_gap"] < 1e-6
    assert r["same_names"] and r["n_grads"] > 10


def test_fsdp2_mixed_precision_keeps_fp32_masters_and_gradients(tiny_dir, tmp_path):
    """align.model.precision's FSDP2 policy (bf16 compute, fp32 reduction) on fp32 master weights, 2 processes (gloo):
    log-probs and gradients as the unsharded fp32 policy under bf16 autocast gives them, gradients in fp32."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", str(ROOT / "tests" / "fsdp2_worker.py"), str(tiny_dir), str(out), "mixed"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["grad_dtypes"] == ["torch.float32"] and r["weight_gap"] < 1e-6 and r["same_names"]
    assert r["logprob_gap"] < 0.05 and r["grad_rel_gap"] < 0.1, r  # bf16 rounding, not lost updates
