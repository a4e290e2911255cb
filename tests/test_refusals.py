"""Inputs that ended in a traceback (issue 40, item 6) are refused before any write, naming the key, file or model
and what was expected: the output directory is never made."""

import json
import shutil
import sys

import pytest

from align.config import ConfigError, load_config
from align.grpo.config import GRPOConfig
from align.grpo.loop import train_grpo
from align.rm import RMConfig, train_rm
from align.sft import SFTConfig, train_sft

from .conftest import DATA


def _sft(model, out, *extra):
    return train_sft(load_config(SFTConfig, None, [f"model.path={model}", f"output_dir={out}",
                                                   f"train_data=[{DATA}/arith/train.jsonl]", "tensorboard=false",
                                                   *extra]))


def _copy(tiny_dir, to):
    shutil.copytree(tiny_dir, to)
    return to


def _edit_config(model, **changes):
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **changes}))


def _smaller_embedding(tiny_dir, to, rows: int):
    """The tiny model with only the first `rows` embedding / LM-head rows (config.json's vocab_size to match), and
    the tiny tokenizer, which has more ids."""
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_dir, to)
    weights = load_file(str(model / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:rows].clone()
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(model, vocab_size=rows)
    return model


def case_epochs_overflow(t, tiny):
    _sft(tiny, t / "out", "epochs=1e308")


def case_rm_epochs_overflow(t, tiny):
    train_rm(load_config(RMConfig, None, [f"model.path={tiny}", f"output_dir={t / 'out'}", "epochs=1e308",
                                          f"train_data=[{DATA}/helpful_pref/train.jsonl]"]))


def case_seed_too_large(t, tiny):
    _sft(tiny, t / "out", f"seed={2**32}")


def case_seed_negative(t, tiny):
    load_config(GRPOConfig, None, [f"model.path={tiny}", f"output_dir={t / 'out'}", "train_data=[a]",
                                   "rewards=[{name: exact_answer}]", "seed=-1"])


def case_reward_module_import_raises(t, tiny, monkeypatch):
    (t / "broken_reward_mod.py").write_text("raise RuntimeError('no judge configured')\n")
    monkeypatch.syspath_prepend(str(t))
    monkeypatch.delitem(sys.modules, "broken_reward_mod", raising=False)
    load_config(GRPOConfig, None, [f"model.path={tiny}", f"output_dir={t / 'out'}", "train_data=[a]",
                                   "rewards=[{name: 'broken_reward_mod:score'}]"])


def case_llama_config_over_deepseek_weights(t, tiny):
    from transformers import LlamaConfig

    model = _copy(tiny, t / "m")
    LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=4).save_pretrained(model)
    _sft(model, t / "out")


def case_edited_vocab_size(t, tiny):
    model = _copy(tiny, t / "m")
    _edit_config(model, vocab_size=2048)
    _sft(model, t / "out")


def case_tokenizer_larger_than_embedding_sft(t, tiny):
    _sft(_smaller_embedding(tiny, t / "m", 512), t / "out")


def case_tokenizer_larger_than_embedding_grpo(t, tiny):
    train_grpo(load_config(GRPOConfig, None, [
        f"model.path={_smaller_embedding(tiny, t / 'm', 512)}", f"output_dir={t / 'out'}",
        f"train_data=[{DATA}/arith/rl_prompts.jsonl]", "rewards=[{name: exact_answer}]", "steps=1"]))


def case_config_json_is_a_list(t, tiny):
    model = _copy(tiny, t / "m")
    (model / "config.json").write_text("[1, 2]")
    _sft(model, t / "out")


CASES = [  # (case, message pattern)
    (case_epochs_overflow, r"key 'epochs' implies more than 1.8e\+308 steps = epochs 1e\+308 x \d+ steps per epoch"),
    (case_rm_epochs_overflow, r"key 'epochs' implies more than 1.8e\+308 steps = epochs 1e\+308 x \d+ pairs"),
    (case_seed_too_large, r"key 'seed' must be an integer in \[0, 2\*\*32 - 1\] = \[0, 4294967295\] \(numpy's seed "
                          r"range\), got 4294967296"),
    (case_seed_negative, r"key 'seed' must be an integer in \[0, 2\*\*32 - 1\].*got -1"),
    (case_reward_module_import_raises, r"key 'rewards\[0\].name': reward 'broken_reward_mod:score': importing module "
                                       r"'broken_reward_mod' raised RuntimeError: no judge configured"),
    (case_llama_config_over_deepseek_weights, r"m: config.json \(model_type 'llama'\) does not describe its weights: "
                                              r"tensor model.layers.0.self_attn.q_proj.weight is \[384, 128\] in "
                                              r"model.safetensors, the config makes it \[128, 128\]"),
    (case_edited_vocab_size, r"tensor (model.embed_tokens|lm_head).weight is \[1024, 128\] in model.safetensors, the "
                             r"config makes it \[2048, 128\] .*config keys of that size: vocab_size=2048"),
    (case_tokenizer_larger_than_embedding_sft, r"tokenizer in .*m has 1024 token ids, more than the model's "
                                               r"vocab_size=512 \(config.json\): ids 512..1023 have no embedding row"),
    (case_tokenizer_larger_than_embedding_grpo, r"tokenizer in .*m has 1024 token ids, more than the model's "
                                                r"vocab_size=512"),
    (case_config_json_is_a_list, r"m/config.json: expected a JSON object of model settings .*got a list"),
]


@pytest.mark.parametrize("case,pattern", CASES, ids=[c.__name__[5:] for c, _ in CASES])
def test_refused_before_any_write(case, pattern, tmp_path, tiny_dir, monkeypatch):
    args = (tmp_path, tiny_dir, monkeypatch) if "monkeypatch" in case.__code__.co_varnames else (tmp_path, tiny_dir)
    with pytest.raises(ConfigError, match=pattern):
        case(*args)
    assert not (tmp_path / "out").exists()


def test_the_intact_model_still_passes_the_checks(tiny_dir):
    from align.model.policy import check_model_dir, load_tokenizer

    assert check_model_dir(tiny_dir)["vocab_size"] == 1024
    assert len(load_tokenizer(tiny_dir)) == 1024


def test_align_tiny_onto_a_file_or_a_read_only_place_is_refused(tmp_path, capsys, monkeypatch):
    import os

    from align.cli import main

    (tmp_path / "f").write_text("mine")
    assert main(["tiny", str(tmp_path / "f")]) == 2
    assert f"key 'OUT_DIR': {tmp_path / 'f'} exists and is a file, not a directory" in capsys.readouterr().err
    assert main(["tiny", str(tmp_path / "f" / "sub")]) == 2
    assert f"{tmp_path / 'f' / 'sub'} cannot be a directory: {tmp_path / 'f'} is a file" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "mine"
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    assert main(["tiny", str(tmp_path / "t")]) == 2
    assert f"{tmp_path / 't'} cannot be written: {tmp_path} is read-only" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["tiny", str(tmp_path / "u"), "--seed", "-3"]) == 2
    assert "key '--seed' must be an integer in [0, 2**32 - 1]" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]

