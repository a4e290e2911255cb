"""A full, read-only or vanished disk (issue 40, item 2): a failed checkpoint leaves the previous one the newest and
no partial files, the run stops with a message naming the path and the bytes needed, and the same command resumes
from the last good step with every step logged once."""

import errno
import os
import shutil
import subprocess

import pytest

from align.config import load_config
from align.errors import StorageError
from align.run import checkpoint as ckpt
from align.run import storage
from align.run.metrics import MetricsLogger, read_metrics
from align.sft import SFTConfig, train_sft

from .conftest import DATA


def _sft(tiny_dir, out, *extra):
    return train_sft(load_config(SFTConfig, None, [
        f"model.path={tiny_dir}", f"output_dir={out}", f"train_data=[{DATA}/arith/train.jsonl]", "batch_size=2",
        "save_every=1", "max_steps=2", "model.lora.enabled=true", "tensorboard=false", *extra]))


def _leftovers(out):
    return [p.name for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_a_checkpoint_the_disk_cannot_hold_stops_the_run_and_the_same_command_resumes(tmp_path, tiny_dir,
                                                                                        monkeypatch, capsys):
    """torch.save's error on a full device carries no errno (`[enforce fail at inline_container.cc:672]`): the free
    space tells. Here the device is 'full' while step 2 is saved."""
    import torch

    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, path, *a, **k):
        if "step-0000002" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 391104 vs 390996")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    with pytest.raises(StorageError) as e:
        _sft(tiny_dir, out)
    step1 = out / "checkpoints" / "step-0000001"
    needed = storage.tree_bytes(step1)
    assert str(e.value) == (
        f"sft: checkpoint of step 2 not saved: no space left on the device: writing {out}/checkpoints/step-0000002 "
        f"needs about {needed / 1e6:.1f} MB ({needed} bytes), 0.0 MB (1000 bytes) free. Its partial files were "
        f"removed; checkpoint {step1} stays the newest. Once the disk is fixed (free space, or fewer checkpoints "
        "kept: keep_last), the same command resumes from step 1")
    assert ckpt.latest_checkpoint(out) == step1 and _leftovers(out) == []
    monkeypatch.undo()
    capsys.readouterr()
    _sft(tiny_dir, out)
    assert "resuming at step 1" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # each step logged once
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_first_checkpoint_failing_says_the_run_starts_over(tmp_path, tiny_dir, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_checksums", full)
    with pytest.raises(StorageError, match=r"sft: checkpoint of step 1 not saved: no space left on the device: .*"
                                           r"needs about [\d.]+ MB \(\d+ bytes\).* no checkpoint of this run was "
                                           r"saved yet, so once the disk is fixed the same command starts the run "
                                           r"over \(its logged steps are replaced, not repeated\)"):
        _sft(tiny_dir, tmp_path / "run", "max_steps=1")
    assert ckpt.list_checkpoints(tmp_path / "run") == [] and _leftovers(tmp_path / "run") == []


def test_a_read_only_disk_and_a_vanished_directory_are_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = run / "checkpoints" / "step-0000002"

    def write(error):
        with storage.guarded_write(target, run, 10, "checkpoint of step 2", lambda: "next"):
            raise error

    with pytest.raises(StorageError, match=rf"checkpoint of step 2 not saved: {run} cannot be written any more "
                                           rf"\(Read-only file system\): writing {target}. next"):
        write(OSError(errno.EROFS, "Read-only file system"))
    with pytest.raises(ValueError, match="a bug"):  # not the disk: the error stays what it was
        write(ValueError("a bug"))
    shutil.rmtree(run)
    with pytest.raises(StorageError, match=rf"the run directory {run} is gone \(deleted, moved or unmounted during "
                                           r"the run\); align does not make it again. Restore it"):
        write(OSError(errno.ENOENT, "No such file or directory"))


def test_metrics_of_a_run_whose_directory_vanished_are_not_written_into_a_new_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    log = MetricsLogger(run, tensorboard=False, prefix="sft ")
    log.log(1, {"loss/sft": 1.0}, echo=False)
    shutil.rmtree(run)
    with pytest.raises(StorageError, match=rf"sft metrics row of step 2 not saved: the run directory {run} is gone"):
        log.log(2, {"loss/sft": 1.0}, echo=False)
    assert not run.exists()


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a tmpfs")
def test_a_real_3_mb_tmpfs_fills_then_the_run_resumes(tmp_path, tiny_dir, capsys):
    """LoRA checkpoints of the tiny model are ~2 MB: the first fits on a 3 MB tmpfs, the second does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "run"
        with pytest.raises(StorageError, match=rf"sft: checkpoint of step 2 not saved: no space left on the device: "
                                               rf"writing {out}/checkpoints/step-0000002 needs about 2.0 MB .*"
                                               r"step-0000001 stays the newest.* resumes from step 1"):
            _sft(tiny_dir, out)
        assert ckpt.latest_checkpoint(out).name == "step-0000001" and _leftovers(out) == []
        subprocess.run(["mount", "-o", "remount,size=40m", str(disk)], check=True)  # space freed
        capsys.readouterr()
        _sft(tiny_dir, out)
        assert "resuming at step 1" in capsys.readouterr().out
        assert [r["step"] for r in read_metrics(out)] == [1, 2]
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a tmpfs")
def test_every_process_of_a_two_process_job_stops_on_a_full_disk_and_none_waits(tmp_path, tiny_dir):
    import sys

    from .conftest import ROOT

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              "29533", "-m", "align", "sft", f"model.path={tiny_dir}", f"output_dir={disk / 'run'}",
                              f"train_data=[{DATA}/arith/train.jsonl]", "max_steps=2", "save_every=1", "batch_size=2",
                              "model.lora.enabled=true", "tensorboard=false"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert job.returncode != 0
        assert job.stderr.count("error: sft: checkpoint of step 2 not saved: no space left on the device") == 2, \
            job.stderr[-3000:]
        assert ckpt.latest_checkpoint(disk / "run").name == "step-0000001" and _leftovers(disk / "run") == []
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a tmpfs")
def test_a_read_only_output_dir_new_or_rerun_is_refused_before_any_work(tmp_path, tiny_dir):
    from align.config import ConfigError
    from align.run.rundir import claim

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cfg = load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"output_dir={disk / 'done'}",
                                            f"train_data=[{DATA}/arith/train.jsonl]"])
        claim(disk / "done", "sft", cfg)  # an earlier run of the same command
        from align.run.lock import unlock_dir

        unlock_dir(disk / "done")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for name in ("new", "done"):
            with pytest.raises(ConfigError, match=rf"key 'output_dir': cannot create the lock file {disk / name}/"
                                                  r"\.align-lock \(Read-only file system\); output_dir must be a "
                                                  "writable directory"):
                _sft(tiny_dir, disk / name)
    finally:
        subprocess.run(["umount", str(disk)])
