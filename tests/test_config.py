"""Config loading: unknown keys, types, overrides, file and line in messages."""

import pytest

from align.config import ConfigError, load_config, parse_overrides
from align.sft import SFTConfig


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model:\n  path: m\n  lora:\n    enabled: true\noutput_dir: out\ntrain_data: [a.jsonl]\nlr: 1e-5\n")
    cfg = load_config(SFTConfig, f, ["lora_unused=1"][:0] + ["model.lora.r=4", "epochs=1"])
    assert cfg.lr == 1e-5 and cfg.model.lora.enabled and cfg.model.lora.r == 4 and cfg.epochs == 1.0
    assert cfg.train_data == ["a.jsonl"]


def test_unknown_key_named_with_line_and_suggestion(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model:\n  path: m\noutput_dir: out\ntrain_data: [a]\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"r.yaml:5: unknown key 'learning_rat'"):
        load_config(SFTConfig, f)
    with pytest.raises(ConfigError, match=r"unknown key 'model.pth' \(did you mean 'model.path'\?\)"):
        load_config(SFTConfig, None, ["model.pth=x", "output_dir=o", "train_data=[a]"])


def test_wrong_types_and_values():
    base = ["model.path=m", "output_dir=o", "train_data=[a]"]
    with pytest.raises(ConfigError, match="key 'batch_size' expects an integer, got 'many'"):
        load_config(SFTConfig, None, base + ["batch_size=many"])
    with pytest.raises(ConfigError, match="key 'batch_size' must be a positive integer, got 0"):
        load_config(SFTConfig, None, base + ["batch_size=0"])
    with pytest.raises(ConfigError, match=r"key 'model.dtype' must be one of"):
        load_config(SFTConfig, None, base + ["model.dtype=float8"])
    with pytest.raises(ConfigError, match="required key 'output_dir' is missing"):
        load_config(SFTConfig, None, ["model.path=m", "train_data=[a]"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(SFTConfig, tmp_path / "bad.yaml")


def test_override_syntax():
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=x"]) == {"a": {"b": 3}, "c": [1, 2], "d": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_non_finite_numbers_are_refused():
    from align.sft import SFTConfig

    for bad in ("lr=.inf", "lr=.nan", "min_lr_ratio=.nan", "lr=-.inf"):
        with pytest.raises(ConfigError, match=r"key '(lr|min_lr_ratio)' must be a finite number"):
            load_config(SFTConfig, None, ["model.path=m", "output_dir=o", "train_data=[x.jsonl]", bad])


def test_duplicate_keys_and_repeated_stages_are_refused_with_their_line(tmp_path):
    from align.recipe import load_recipe
    from align.sft import SFTConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  path: m\noutput_dir: o\nlr: 1e-5\nlr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"c.yaml:5: duplicate key 'lr' \(first at line 4\)"):
        load_config(SFTConfig, cfg)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  sft:\n    kind: sft\n  sft:\n    kind: sft\n")
    with pytest.raises(ConfigError, match=r"r.yaml:4: duplicate key 'sft'"):
        load_recipe(str(recipe), [])


def test_alias_bomb_is_refused_in_milliseconds(tmp_path):
    import time

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="YAML aliases"):
        load_config(__import__("align.sft", fromlist=["SFTConfig"]).SFTConfig, bomb)
    assert time.perf_counter() - t < 1.0


def test_user_errors_share_one_base_the_cli_catches(capsys):
    from align.cli import main
    from align.errors import AlignError, CheckpointError, ConfigError, DataError, NonFiniteError

    assert all(issubclass(c, AlignError) for c in (ConfigError, DataError, NonFiniteError, CheckpointError))
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, RuntimeError)  # older excepts hold
    assert main(["sft", "model.path=/nonexistent", "output_dir=/tmp/x", "train_data=[a]"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
