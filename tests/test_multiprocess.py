"""SFT as 2 processes (gloo, on CPU) equals 1 process with the same global batch: same losses step by step."""

import os
import subprocess
import sys

import pytest

from align.metrics import read_metrics

from .conftest import DATA

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
