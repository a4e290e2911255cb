"""Run directories as users write them (issue 40): `~` and `$VAR` expanded as a shell would, an empty path or an
unset variable refused naming the key, and a recipe's stage names plain names (never a path out of run_dir)."""

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
