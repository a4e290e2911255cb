"""Run directories as users write them (issue 40): `~` and `$VAR` expanded as a shell would, an empty path or an
unset variable refused naming the key, a recipe's stage names plain names (never a path out of run_dir), and
`align run` claims its run directory as the stages claim theirs (a directory holding others' files is refused)."""

import json
import os
from pathlib import Path

import pytest

from align.config import ConfigError, load_config
from align.grpo.config import GRPOConfig
from align.recipe import load_recipe
from align.rm import RMConfig
from align.sft import SFTConfig
from align.tiny import TinyConfig

STAGES = {
    SFTConfig: ["model.path=m", "train_data=[a]"],
    RMConfig: ["model.path=m", "train_data=[a]"],
    GRPOConfig: ["model.path=m", "train_data=[a]", "rewards=[{name: exact_answer}]"],
    TinyConfig: [],
}


@pytest.mark.parametrize("cls", list(STAGES), ids=lambda c: c.__name__)
def test_output_dir_expands_home_and_variables(cls, monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_RUNS", "/data/runs")
    home = str(Path.home())
    assert load_config(cls, None, [*STAGES[cls], "output_dir=~/x"]).output_dir == f"{home}/x"
    assert load_config(cls, None, [*STAGES[cls], "output_dir=$ALIGN_TEST_RUNS/x"]).output_dir == "/data/runs/x"
    assert load_config(cls, None, [*STAGES[cls], "output_dir=${ALIGN_TEST_RUNS}/y"]).output_dir == "/data/runs/y"


@pytest.mark.parametrize("cls", list(STAGES), ids=lambda c: c.__name__)
def test_an_empty_output_dir_or_an_unset_variable_is_refused_naming_the_key(cls, monkeypatch):
    monkeypatch.delenv("ALIGN_TEST_UNSET", raising=False)
    for empty in ("output_dir=", "output_dir=' '"):
        with pytest.raises(ConfigError, match=r"key 'output_dir' must be a directory path, got"):
            load_config(cls, None, [*STAGES[cls], empty])
    with pytest.raises(ConfigError, match=r"key 'output_dir': '\$ALIGN_TEST_UNSET/x' uses the environment variable "
                                          r"\$ALIGN_TEST_UNSET, which is not set"):
        load_config(cls, None, [*STAGES[cls], "output_dir=$ALIGN_TEST_UNSET/x"])
    with pytest.raises(ConfigError, match=r"key 'output_dir': .* unknown user \(~no_such_user_align\)"):
        load_config(cls, None, [*STAGES[cls], "output_dir=~no_such_user_align/x"])


def _recipe(tmp_path, head: str, stage: str = "tiny") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"{head}stages:\n  {stage}: {{kind: tiny}}\n")
    return path


def test_recipe_run_dir_expands_and_an_empty_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_RUNS", str(tmp_path / "runs"))
    run_dir, stages, _, _ = load_recipe(str(_recipe(tmp_path, "run_dir: $ALIGN_TEST_RUNS/q\n")))
    assert run_dir == tmp_path / "runs" / "q" and stages[0].config.output_dir == str(tmp_path / "runs/q/tiny")
    run_dir, _, _, _ = load_recipe(str(_recipe(tmp_path, "run_dir: ~/q\n")))
    assert run_dir == Path.home() / "q"
    for bad in ('run_dir: ""\n', "run_dir:\n"):
        with pytest.raises(ConfigError, match=r"r.yaml:1: key 'run_dir' must be a directory path"):
            load_recipe(str(_recipe(tmp_path, bad)))
    with pytest.raises(ConfigError, match=r"key 'run_dir' must be a directory path, got ''"):
        load_recipe(str(_recipe(tmp_path, "")), ["run_dir="])


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "'.hidden'", "'a b'", "'x\\\\y'", "1"])
def test_a_stage_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    path = _recipe(tmp_path, f"run_dir: {tmp_path / 'runs'}\n", stage=name)
    with pytest.raises(ConfigError, match=r"r.yaml:\d+: key 'stages\..*': a stage name must be a plain name"):
        load_recipe(str(path))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_a_plain_stage_name_is_accepted(tmp_path):
    _, stages, _, _ = load_recipe(str(_recipe(tmp_path, f"run_dir: {tmp_path}\n", stage="rm_safety-2")))
    assert stages[0].config.output_dir == os.path.join(tmp_path, "rm_safety-2")


def test_align_tiny_refuses_an_empty_out_dir(capsys):
    from align.cli import main

    assert main(["tiny", ""]) == 2
    assert "key 'OUT_DIR' must be a directory path, got ''" in capsys.readouterr().err


def test_align_run_refuses_a_run_dir_holding_files_it_did_not_write(tmp_path, capsys):
    """A user's report.md and recipe.json in run_dir are never overwritten: refused before any write (issue 40)."""
    from align.cli import main
    from align.recipe import run_recipe

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("# my notes")
    (run / "recipe.json").write_text('{"mine": 1}')
    with pytest.raises(ConfigError, match=rf"key 'run_dir': {run} already holds files align did not write "
                                          r"\(recipe.json, report.md\); choose an empty or new directory"):
        run_recipe(str(_recipe(tmp_path, f"run_dir: {run}\n")))
    assert main(["run", str(_recipe(tmp_path, f"run_dir: {run}\n")), "--check"]) == 2
    assert "already holds files align did not write" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["recipe.json", "report.md"]
    assert (run / "report.md").read_text() == "# my notes" and (run / "recipe.json").read_text() == '{"mine": 1}'


def test_a_stage_directory_and_a_recipe_run_directory_are_not_taken_for_each_other(tmp_path, tiny_dir):
    from align.recipe import claim_run_dir
    from align.run.rundir import claim

    stage_dir, run = tmp_path / "sft", tmp_path / "run"
    sft = load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"output_dir={stage_dir}", "train_data=[a]"])
    claim(stage_dir, "sft", sft)
    with pytest.raises(ConfigError, match=rf"key 'run_dir': {stage_dir} is the output_dir of an `align sft` run"):
        claim_run_dir(stage_dir, [])
    claim_run_dir(run, [])
    assert json.loads((run / "align-run.json").read_text()) == {"kind": "recipe"}
    claim_run_dir(run, [])  # the same run directory again: its own
    for force in (False, True):
        with pytest.raises(ConfigError, match=rf"key 'output_dir': {run} is the run directory of an `align run` "
                                              r"recipe"):
            claim(run, "sft", sft, force=force)


def test_a_run_dir_from_before_manifests_is_taken_as_align_s(tmp_path):
    from align.recipe import claim_run_dir, load_recipe

    run = tmp_path / "run"
    (run / "tiny").mkdir(parents=True)
    (run / "recipe.json").write_text(json.dumps({"stages": {"tiny": {"kind": "tiny"}}}))
    (run / "report.md").write_text("report")
    (run / "stages.png").write_bytes(b"png")
    _, stages, _, _ = load_recipe(str(_recipe(tmp_path, f"run_dir: {run}\n")))
    claim_run_dir(run, stages)
    assert (run / "align-run.json").is_file()
    (run / "align-run.json").unlink()
    (run / "thesis.tex").write_text("mine")  # not a name align writes: refused
    with pytest.raises(ConfigError, match=r"already holds files align did not write \(recipe.json, report.md, "
                                          r"stages.png, thesis.tex, tiny\)"):
        claim_run_dir(run, stages)


def test_a_corrected_command_takes_over_a_directory_holding_only_a_failed_attempt_s_manifest(tmp_path, tiny_dir,
                                                                                               capsys):
    """An attempt that failed after claiming (before it wrote anything else) does not block the corrected command."""
    from align.run.rundir import claim

    out = tmp_path / "out"
    args = [f"model.path={tiny_dir}", f"output_dir={out}", "train_data=[a]"]
    claim(out, "sft", load_config(SFTConfig, None, [*args, "lr=1.0"]))
    assert claim(out, "sft", load_config(SFTConfig, None, [*args, "lr=1e-5"])) is False
    assert json.loads((out / "align-run.json").read_text())["identity"]["lr"] == 1e-5
    assert "held only the manifest of an attempt that wrote nothing else; taken over" in capsys.readouterr().out
    (out / "metrics.jsonl").write_text("")  # it wrote something: a differing command is refused as before
    with pytest.raises(ConfigError, match=r"holds another run \(lr: 1e-05 there, 2.0 now\)"):
        claim(out, "sft", load_config(SFTConfig, None, [*args, "lr=2.0"]))
