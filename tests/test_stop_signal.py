"""SIGTERM (a scheduler's preemption) sent to a real `align sft` process mid-run: the run stops at the next step
boundary, checkpoints that step although no checkpoint was due, exits 143 with a message naming the step and the
checkpoint, and the same command resumes to the very weights an uninterrupted run ends with (issue 40)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from align.run.checkpoint import list_checkpoints, read_state
from align.run.metrics import read_metrics

from .conftest import DATA, ROOT

STEPS = 6


def _cmd(model, out):
    return [sys.executable, "-u", "-m", "align", "sft", f"model.path={model}", f"output_dir={out}",
            f"train_data=[{DATA}/arith/train.jsonl]", f"max_steps={STEPS}", "batch_size=4", "lr=2e-3",
            "save_every=0", "keep_last=0", "eval_every=0", "log_every=1", "tensorboard=false"]


def _env():
    return {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "2",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _steps_logged(out):
    try:
        return [r["step"] for r in read_metrics(out)]
    except (FileNotFoundError, OSError):
        return []


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def test_sigterm_mid_run_stops_at_a_step_boundary_checkpoints_and_resumes_exactly(tiny_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(tiny_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    deadline = time.time() + 240
    while 2 not in _steps_logged(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)  # during step 3 (or just between 2 and 3)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "sft: received SIGTERM: stopping after the current step" in stderr
    stopped = [c for c in list_checkpoints(out)]
    assert len(stopped) == 1, stderr[-2000:]  # save_every=0: no checkpoint was due before the end
    done = read_state(stopped[0])["step"]
    assert 2 <= done < STEPS
    assert (f"error: sft: stopped by SIGTERM after step {done} of {STEPS}; checkpoint {stopped[0]} saved; the same "
            "command resumes from it") in stderr
    assert _steps_logged(out) == list(range(1, done + 1))
    assert not (out / "final").exists()

    resumed = subprocess.run(_cmd(tiny_dir, out), capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {done}" in resumed.stdout
    assert _steps_logged(out) == list(range(1, STEPS + 1))  # each step logged once

    full = tmp_path / "full"
    whole = subprocess.run(_cmd(tiny_dir, full), capture_output=True, text=True, env=_env(), timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a, b = _weights(out), _weights(full)
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff == pytest.approx(0.0, abs=1e-6), diff


def test_the_handler_is_only_there_while_steps_run():
    from align.run.stop import stop_signal

    before = signal.getsignal(signal.SIGTERM)
    with stop_signal("sft") as received:
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


def _wait_for_step(proc, out, step):
    deadline = time.time() + 120
    while step not in _steps_logged(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]


def test_ctrl_c_stops_at_a_step_boundary_and_a_second_one_aborts_with_one_line(tiny_dir, tmp_path):
    """SIGINT (Ctrl-C) as SIGTERM: the finished step checkpointed, exit 130 with a one-line message, no traceback;
    the resumed run's second Ctrl-C in a row aborts at once (KeyboardInterrupt, printed as one line, exit 130)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(tiny_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    _wait_for_step(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    assert "sft: received SIGINT: stopping after the current step (checkpointed); Ctrl-C again aborts now" in stderr
    (ckpt,) = list_checkpoints(out)
    done = read_state(ckpt)["step"]
    assert f"error: sft: stopped by SIGINT after step {done} of {STEPS}; checkpoint {ckpt} saved" in stderr

    proc = subprocess.Popen(_cmd(tiny_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    lines: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    _wait_for_step(proc, out, done + 1)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 30
    while not any("received SIGINT" in line for line in lines) and time.time() < deadline:
        time.sleep(0.01)  # the first one is handled: the second is a second, not one coalesced with it
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert stderr.rstrip().splitlines()[-1] == ("align sft: interrupted (Ctrl-C); the work since the last checkpoint "
                                                "is lost, and the same command resumes from that checkpoint, if "
                                                "there is one")
    assert not (out / "final").exists()


def test_a_ctrl_c_outside_the_steps_is_one_line_and_exit_130(monkeypatch, capsys):
    """A KeyboardInterrupt that escapes a command (loading a model, evaluating) is printed as one line, exit 130."""
    from align import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_tiny", interrupted)
    assert cli.main(["tiny", "somewhere"]) == 130
    assert capsys.readouterr().err.strip() == "align tiny: interrupted (Ctrl-C)"
