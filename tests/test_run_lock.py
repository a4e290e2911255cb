"""One run per directory (issue 40): a second process on a locked output_dir / run_dir is refused naming the
holder's pid and host, the lock goes with its process however it ends, and align's own leftovers (the lock file, a
`.align-run.json.tmp-PID` of a killed run) never count as someone else's files. Two real processes; no training."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from align.config import ConfigError, load_config
from align.run.lock import LOCK, lock_dir, unlock_dir
from align.run.rundir import MANIFEST, claim
from align.sft import SFTConfig, train_sft

from .conftest import DATA, ROOT

HOLDER = textwrap.dedent("""
    import sys, time
    from align.run.lock import lock_dir
    lock_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder():
    """Start a second process that locks a directory and sleeps; yields start(directory) -> the process."""
    procs = []

    def start(directory):
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True,
                                env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _cfg(model, out, *extra):
    return load_config(SFTConfig, None, [f"model.path={model}", f"output_dir={out}",
                                         f"train_data=[{DATA}/arith/train.jsonl]", "max_steps=1", "batch_size=4",
                                         "eval_every=0", "tensorboard=false", *extra])


def test_a_locked_directory_is_refused_naming_the_holders_pid_and_host_until_it_is_killed(tmp_path, holder):
    out = tmp_path / "run"
    proc = holder(out)
    with pytest.raises(ConfigError, match=rf"key 'output_dir': .*in use by another align run, pid {proc.pid} on "
                                          rf"host {socket.gethostname()}"):
        lock_dir(out)
    info = json.loads((out / LOCK).read_text())
    assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the OS releases the lock
    proc.wait()
    lock_dir(out)
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    lock_dir(out)  # this process already holds it: no refusal
    unlock_dir(out)


def test_a_second_sft_on_a_running_runs_directory_is_refused_before_any_write(tiny_dir, tmp_path, holder):
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir, out)
    proc = holder(out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match=rf"in use by another align run, pid {proc.pid} "):
        train_sft(cfg)
    assert sorted(p.name for p in out.iterdir()) == before == [LOCK]
    with pytest.raises(ConfigError, match=rf"pid {proc.pid} "):  # resume=force takes over a run, not a process
        train_sft(_cfg(tiny_dir, out, "resume=force"))


def test_a_second_align_run_on_a_locked_run_dir_is_refused(tmp_path, holder):
    from align.recipe import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'runs'}\nstages:\n  tiny: {{kind: tiny}}\n")
    proc = holder(tmp_path / "runs")
    with pytest.raises(ConfigError, match=rf"key 'run_dir': .*in use by another align run, pid {proc.pid} "):
        run_recipe(str(recipe))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [LOCK]


def test_a_lock_file_that_cannot_be_created_is_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(ConfigError, match=r"key 'output_dir': cannot create the lock file .*ro/.align-lock"):
            lock_dir(ro)
    finally:
        ro.chmod(0o700)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_manifest_temp_file_left_by_a_killed_run_never_blocks_the_rerun(tiny_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    left = out / f".{MANIFEST}.tmp-{_dead_pid()}"
    left.write_text('{"kind": "sf')  # killed inside atomic_write_text
    cfg = _cfg(tiny_dir, out)
    assert claim(out, "sft", cfg) is False  # a new run, not "files align did not write"
    assert not left.exists() and (out / MANIFEST).is_file()
    left.write_text("{}")  # and again once the manifest exists: the same command resumes
    assert claim(out, "sft", cfg) is True
    assert not left.exists()
    unlock_dir(out)


def test_a_temp_file_of_a_live_process_is_ignored_and_kept(tiny_dir, tmp_path, holder):
    out = tmp_path / "run"
    out.mkdir()
    other = holder(tmp_path / "elsewhere")  # some live process other than this one
    live = out / f".{MANIFEST}.tmp-{other.pid}"
    live.write_text("{}")
    assert claim(out, "sft", _cfg(tiny_dir, out)) is False
    assert live.exists()
    unlock_dir(out)


def test_every_process_of_a_two_process_job_is_refused_and_none_waits(tiny_dir, tmp_path, holder):
    """Under torch.distributed.run both processes stop with the message (exit non-zero), none waits forever."""
    out = tmp_path / "run"
    proc = holder(out)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", "-m", "align", "sft", f"model.path={tiny_dir}", f"output_dir={out}",
                          f"train_data=[{DATA}/arith/train.jsonl]", "max_steps=1", "batch_size=4",
                          "tensorboard=false"], capture_output=True, text=True, env=env, timeout=240)
    assert job.returncode != 0
    assert job.stderr.count(f"in use by another align run, pid {proc.pid} ") == 2, job.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [LOCK]
