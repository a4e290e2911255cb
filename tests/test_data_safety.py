"""Nothing a user had is lost, no run resumes state that is not its own, checkpoints are verified before they are
trusted, and non-finite numbers stop a run before anything is written (issue 14's data cases, one test each)."""

import json
import shutil

import pytest
import torch

from align.run.checkpoint import checkpoint_path, latest_checkpoint, list_checkpoints
from align.config import ConfigError, load_config
from align.run.finite import NonFiniteError
from align.run.metrics import read_metrics
from align.sft import SFTConfig, train_sft

from .conftest import DATA


def _cfg(model, out, *extra):
    return load_config(SFTConfig, None, [f"model.path={model}", f"output_dir={out}",
                                         f"train_data=[{DATA}/arith/train.jsonl]", "lr=2e-3", "max_steps=4",
                                         "batch_size=4", "save_every=2", "keep_last=0", "eval_every=0",
                                         "tensorboard=false", *extra])


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_directory_with_files_align_did_not_write_is_refused_and_kept(tiny_dir, tmp_path):
    out = tmp_path / "thesis"
    (out / "final").mkdir(parents=True)
    (out / "final" / "thesis.tex").write_text("\\chapter{One}")
    (out / "metrics.jsonl").write_text('{"their": "metrics"}\n')
    before = _tree(out)
    with pytest.raises(ConfigError, match=r"already holds files align did not write \(final, metrics.jsonl\)"):
        train_sft(_cfg(tiny_dir, out))
    assert _tree(out) == before


def test_another_runs_state_is_refused_naming_the_keys_and_taken_over_only_with_force(tiny_dir, tmp_path):
    out = tmp_path / "run"
    train_sft(_cfg(tiny_dir, out, "lr=1e-3", "max_steps=2"))
    before = _tree(out)
    with pytest.raises(ConfigError, match=r"holds another run \(lr: 0.001 there, 1e-06 now\).*resume=force"):
        train_sft(_cfg(tiny_dir, out, "lr=1e-6", "max_steps=2"))
    assert _tree(out) == before
    other = tmp_path / "other-model"
    shutil.copytree(tiny_dir, other)
    with pytest.raises(ConfigError, match=r"model.path: .* there, .*other-model.* now"):
        train_sft(_cfg(other, out, "lr=1e-3", "max_steps=2"))
    train_sft(_cfg(tiny_dir, out, "lr=1e-6", "max_steps=2", "resume=force"))
    manifest = json.loads((out / "align-run.json").read_text())
    assert manifest["identity"]["lr"] == 1e-6


def test_force_never_resumes_another_models_checkpoint(tiny_dir, tmp_path):
    """resume=force over a run of model A that holds a checkpoint, started with model B: refused before any write,
    naming both models; with no checkpoint there (a run that failed before its first save) force takes over."""
    from align.run.lock import unlock_dir
    from align.run.rundir import MANIFEST, claim

    out = tmp_path / "run"
    assert claim(out, "sft", _cfg(tiny_dir, out)) is False  # model A's manifest, no training
    unlock_dir(out)
    step = checkpoint_path(out, 2)
    step.mkdir(parents=True)
    (step / "state.json").write_text('{"step": 2}')
    other = tmp_path / "model-b"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "initializer_range": 0.05}))
    before = _tree(out)
    with pytest.raises(ConfigError, match=rf"key 'resume': resume=force would resume {step}, the state of sft of "
                                          rf"model '{tiny_dir}' \(config.json sha256 \w+\), as a run of sft of model "
                                          rf"'{other}' \(config.json sha256 \w+\); .* new output_dir"):
        train_sft(_cfg(other, out, "resume=force"))
    assert _tree(out) == before
    shutil.rmtree(out / "checkpoints")
    assert claim(out, "sft", _cfg(other, out, "resume=force"), force=True) is False
    unlock_dir(out)
    assert json.loads((out / MANIFEST).read_text())["identity"]["model.path"] == str(other)


def test_a_grpo_run_resumes_after_a_rewards_timeout_or_isolation_changed(tiny_dir, tmp_path):
    """timeout_s / isolate say how a reward runs, not what it scores: a manifest written when timeout_s defaulted
    to 0 still names the same run; a changed reward weight does not."""
    from align.grpo.config import GRPOConfig
    from align.run.lock import unlock_dir
    from align.run.rundir import MANIFEST, claim

    out = tmp_path / "run"

    def cfg(reward):
        return load_config(GRPOConfig, None, [f"model.path={tiny_dir}", f"output_dir={out}",
                                              f"train_data=[{DATA}/arith/rl_prompts.jsonl]", f"rewards=[{reward}]"])

    assert claim(out, "grpo", cfg("{name: exact_answer}")) is False
    unlock_dir(out)
    (out / "metrics.jsonl").write_text('{"step": 0}\n')  # a run that logged: not a manifest-only failed attempt
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["identity"]["rewards"][0]["timeout_s"] == 300.0
    manifest["identity"]["rewards"][0].update(timeout_s=0.0, isolate=True)  # as an older align recorded it
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert claim(out, "grpo", cfg("{name: exact_answer, timeout_s: 60}")) is True
    unlock_dir(out)
    with pytest.raises(ConfigError, match=r"holds another run \(rewards: "):
        claim(out, "grpo", cfg("{name: exact_answer, weight: 2}"))


def test_the_same_command_resumes_and_more_steps_continue(tiny_dir, tmp_path):
    out = tmp_path / "run"
    train_sft(_cfg(tiny_dir, out, "max_steps=2"))
    train_sft(_cfg(tiny_dir, out, "max_steps=4"))
    assert [r["step"] for r in read_metrics(out) if "loss/sft" in r] == [1, 2, 3, 4]


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_one_used(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_sft(_cfg(tiny_dir, out))
    newest = checkpoint_path(out, 4) / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    assert latest_checkpoint(out) == checkpoint_path(out, 2)
    assert f"{newest}: contents differ from the checksum" in capsys.readouterr().out


def test_a_checkpoint_with_nan_weights_is_refused(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from align.run.checkpoint import write_checksums

    out = tmp_path / "run"
    train_sft(_cfg(tiny_dir, out))
    ck = checkpoint_path(out, 4)
    weights = load_file(str(ck / "model.safetensors"))
    name = next(iter(weights))
    weights[name][0] = float("nan")
    save_file(weights, str(ck / "model.safetensors"), metadata={"format": "pt"})
    write_checksums(ck)  # even with matching checksums
    assert latest_checkpoint(out) == checkpoint_path(out, 2)
    assert f"tensor {name} holds NaN or inf" in capsys.readouterr().out


def test_nan_input_weights_stop_at_the_first_step_and_nothing_is_saved(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, bad)
    model = AutoModelForCausalLM.from_pretrained(bad)
    with torch.no_grad():
        model.model.embed_tokens.weight[5:50] = float("nan")
    model.save_pretrained(bad)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"sft step 1: loss/sft is nan; the step was not applied"):
        train_sft(_cfg(bad, out))
    assert list_checkpoints(out) == [] and not (out / "final").exists()


def test_on_nonfinite_skip_drops_the_step(tiny_dir, tmp_path, monkeypatch):
    import align.sft as sft
    from align.model.policy import load_for_training

    real = sft._nll_sum
    calls = []

    def nan_once(model, mb, cfg, moe):
        nll, *rest = real(model, mb, cfg, moe)
        calls.append(1)
        return (nll * float("nan") if len(calls) == 1 else nll, *rest)

    monkeypatch.setattr(sft, "_nll_sum", nan_once)
    out = tmp_path / "run"
    train_sft(_cfg(tiny_dir, out, "on_nonfinite=skip", "max_steps=2", "save_every=0"))
    rows = [r for r in read_metrics(out) if "loss/sft" in r]
    assert rows[0]["train/skipped_nonfinite"] == 1 and rows[1]["train/skipped_nonfinite"] == 1
    assert all(torch.isfinite(p).all() for p in load_for_training(_cfg(tiny_dir, out).model, "cpu",
                                                                           out / "final").parameters())


def test_a_half_written_metrics_line_is_dropped_with_a_warning(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_sft(_cfg(tiny_dir, out, "max_steps=2"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss/sft": 0.5, "trai')
    train_sft(_cfg(tiny_dir, out, "max_steps=4"))
    assert "dropped a half-written last line" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out) if "loss/sft" in r] == [1, 2, 3, 4]


def test_leftover_temporary_directories_are_removed_at_start(tiny_dir, tmp_path):
    out = tmp_path / "run"
    train_sft(_cfg(tiny_dir, out, "max_steps=2"))
    left = out / "checkpoints" / ".step-0000004.tmp-99999"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    train_sft(_cfg(tiny_dir, out, "max_steps=2"))
    assert not left.exists()


def test_isolated_math_reward_checks_columns_and_lets_the_process_exit(tmp_path):
    """A factory reward under isolate: its columns are checked before any work, and a script that used it exits.
    The per-answer limit is 60 s, not 5: on a loaded 2-core machine the verifier's first call (worker start, sympy
    import) took over 5 s and the answer came back unscored (None)."""
    import subprocess
    import sys

    from rewards.combine import RewardError, RewardSpec, check_columns

    with pytest.raises(RewardError, match="needs column 'answer'"):
        check_columns([RewardSpec(name="math", isolate=True, timeout_s=60)], [{"row": "x.jsonl:row 1"}])
    script = tmp_path / "s.py"
    script.write_text("from rewards.combine import RewardSpec, close_rewards\nif __name__ == '__main__':\n"
                      "    s = RewardSpec(name='math', isolate=True, timeout_s=60, args={'timeout_s': 60})\n"
                      "    print(s.load()(['q'], ['so \\\\boxed{2x}'], answer=['x+x']).scores)\n"
                      "    close_rewards([s])\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                       cwd=str(DATA.parent))
    assert r.returncode == 0 and "[1.0]" in r.stdout, r.stderr[-2000:]
