"""SIGKILL at each phase of a GRPO step (generation, scoring, update, checkpoint write), then the same command: it
resumes from the last complete checkpoint, no checkpoint is ever half-written, and the resumed run's metrics equal an
uninterrupted run's (same seed, same data order). Disk-full and out-of-memory during a checkpoint write leave the
previous checkpoint usable."""

import errno
import os
import subprocess
import sys

import pytest

from align.run.checkpoint import latest_checkpoint, list_checkpoints, read_state
from align.run.metrics import read_metrics

from .conftest import DATA

STEPS = 3


def _cmd(model, out):
    return [sys.executable, "-m", "align", "grpo", f"model.path={model}", f"output_dir={out}",
            f"train_data=[{DATA}/arith/rl_prompts.jsonl]", "rewards=[{name: exact_answer}, "
            "{name: 'tests.test_grpo_loop:char_count', weight: 0.1}]", "group_size=4", "prompts_per_step=2",
            f"steps={STEPS}", "sampling.max_new_tokens=8", "lr=1e-3", "save_every=1", "keep_last=0",
            "tensorboard=false"]


def _run(model, out, fault=None):
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("ALIGN_FAULT", None)
    if fault:
        env["ALIGN_FAULT"] = fault
    return subprocess.run(_cmd(model, out), capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert _run(tiny_dir, out).returncode == 0
    return {r["step"]: r for r in read_metrics(out)}


@pytest.mark.parametrize("phase", ["generation", "scoring", "update", "checkpoint"])
def test_kill_at_each_phase_then_resume(phase, tiny_dir, tmp_path, uninterrupted):
    out = tmp_path / "run"
    killed = _run(tiny_dir, out, fault=f"{phase}:2")
    assert killed.returncode == -9, killed.stderr[-1000:]
    # only complete checkpoints exist (step 1); a checkpoint cut mid-write left no step-2 directory
    assert [read_state(c)["step"] for c in list_checkpoints(out)] == [1]
    assert not (out / "checkpoints" / "step-0000002").exists()
    resumed = _run(tiny_dir, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 1" in resumed.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no duplicated or missing step
    for r in rows:
        want = uninterrupted[r["step"]]
        for key in ("reward/total", "rollout/completion_len", "loss/policy", "loss/kl", "policy/entropy"):
            assert r[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (phase, r["step"], key)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), MemoryError()])
def test_failed_checkpoint_write_keeps_the_previous_one(tiny_dir, tmp_path, monkeypatch, failure):
    from align.config import load_config
    from align.grpo.config import GRPOConfig
    from align.grpo.loop import train_grpo
    from align.model.policy import ModelConfig, load_policy

    cfg = load_config(GRPOConfig, None, _cmd(tiny_dir, tmp_path / "run")[4:])
    cfg.steps = 1
    train_grpo(cfg)
    first = latest_checkpoint(tmp_path / "run")
    before = sorted(p.name for p in first.iterdir())

    import torch

    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("trainer_state.pt"):
            raise failure
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    cfg.steps = 2
    from align.errors import StorageError

    with pytest.raises(StorageError if isinstance(failure, OSError) else type(failure)):  # a full disk: named
        train_grpo(cfg)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run") == first and sorted(p.name for p in first.iterdir()) == before
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]  # no debris
    load_policy(ModelConfig(path=str(first)), trainable=False)  # still loads
    cfg.steps = 2
    assert train_grpo(cfg)["steps"] == 2  # and the run resumes from it


def test_the_step_0_row_is_logged_once_after_a_restart(tmp_path):
    """The start evaluation's step-0 row of an attempt killed before its first checkpoint (ALIGN_FAULT=generation:1)
    is not kept beside the restarted run's own; a resumed run keeps the rows its checkpoint covers, step 0's
    included. No training: the logger as start_run drives it."""
    from align.run.metrics import MetricsLogger

    killed = MetricsLogger(tmp_path, tensorboard=False)
    killed.log(0, {"eval/accuracy": 0.25}, echo=False)  # then SIGKILL in step 1: no checkpoint
    restarted = MetricsLogger(tmp_path, tensorboard=False)
    restarted.truncate_after(0)  # start_run: no checkpoint, start = 0
    restarted.log(0, {"eval/accuracy": 0.25}, echo=False)
    for step in (1, 2, 3):
        restarted.log(step, {"loss/grpo": 0.1 * step}, echo=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]

    resumed = MetricsLogger(tmp_path, tensorboard=False)
    resumed.truncate_after(2)  # killed after step 3's row, before its checkpoint: resumes from step 2's
    resumed.log(3, {"loss/grpo": 0.3}, echo=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
