"""Weights & Biases settings (align/run/tracking.py) against a stand-in `wandb` module: the run's settings as its
config, a fresh id per new run and the same id when align resumes, an error when asked for and not installed."""

import sys
import types

import pytest

from align.config import ConfigError, load_config
from align.run.tracking import WandbConfig, start_wandb
from align.sft import SFTConfig

from .conftest import DATA


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")
    module.__spec__ = types.SimpleNamespace(name="wandb")
    module.init = lambda **kw: calls.append(kw) or types.SimpleNamespace(log=lambda *a, **k: None,
                                                                          finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "wandb" else None)
    return calls


def test_new_runs_get_fresh_ids_resumed_runs_keep_theirs(tmp_path, fake_wandb):
    cfg = WandbConfig(project="p", tags=["a"])
    start_wandb(cfg, tmp_path, {"lr": 1e-3}, resumed=False)
    start_wandb(cfg, tmp_path, {"lr": 1e-3}, resumed=True)
    start_wandb(cfg, tmp_path, {"lr": 2e-3}, resumed=False)  # e.g. resume=force with other settings: a new run
    first, resumed, other = fake_wandb
    assert resumed["id"] == first["id"] != other["id"] and resumed["resume"] == "allow" and first["resume"] is None
    assert first["config"] == {"lr": 1e-3} and first["name"] == tmp_path.name and first["tags"] == ["a"]
    assert start_wandb(WandbConfig(), tmp_path, {}, resumed=False) is None  # off by default


def test_asked_for_and_not_installed_is_refused_by_key(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"key 'wandb.project' asks for Weights & Biases, which is not installed"):
        load_config(SFTConfig, None, [f"model.path={tmp_path}", f"output_dir={tmp_path}/o",
                                      f"train_data=[{DATA}/arith/train.jsonl]", "wandb.project=p"])
    monkeypatch.setenv("WANDB_PROJECT", "p")
    with pytest.raises(ConfigError, match="the WANDB_PROJECT environment variable asks for Weights & Biases"):
        WandbConfig().validate()
