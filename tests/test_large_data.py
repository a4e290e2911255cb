"""Large data: JSONL rows read from disk as they are drawn (the same rows as reading them all), SFT tokenised per
batch (the same examples), GRPO prompts measured up front or when drawn, and step counts no run reaches refused."""

import os
import time

import pytest

from align.config import MAX_STEPS, ConfigError, load_config, require_steps
from align.grpo import loop
from align.grpo.config import GRPOConfig
from align.run.data import (IGNORE, DataError, TokenizedChats, chat_rows, load_chats, load_prompts, load_rows,
                            prompt_rows, tokenize_chats)
from align.run.datafiles import JsonlRows
from align.sft import SFTConfig, _prepare_data, train_sft

from .conftest import DATA, chat, write_jsonl


def test_jsonl_rows_are_read_from_the_file_as_asked_for(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q1", "id": "a"}\n\n  \n{"prompt": "q2", "answer": "4"}\n{"prompt": "q3", "x": [1]}\n')
    rows = JsonlRows(path)
    expected = [{"prompt": "q1", "id": "a", "answer": None, "x": None},
                {"prompt": "q2", "id": None, "answer": "4", "x": None},
                {"prompt": "q3", "id": None, "answer": None, "x": [1]}]
    assert len(rows) == 3 and list(rows) == expected  # blank lines are not rows; every row has every key
    assert [rows[i] for i in (2, 0, 1, -1)] == [expected[2], expected[0], expected[1], expected[2]]
    with pytest.raises(IndexError):
        rows[3]


def test_a_repeated_id_is_found_with_both_rows(tmp_path):
    rows = [{"prompt": f"q{i}", "id": i % 5 if i < 9 else "late"} for i in range(12)] + [{"prompt": "z", "id": "late"}]
    # ids 0..4, then 0 again at row 6 (repeats row 1): the first repeat in file order, as reading all rows finds it
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:row 6: field 'id' 0 repeats row 1$"):
        load_rows(path)
    lists = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "a", "id": [1, {"b": 2}]}, {"prompt": "b", "id": 3},
                                               {"prompt": "c", "id": [1, {"b": 2}]}])
    with pytest.raises(DataError, match=r"row 3: field 'id' \[1, \{'b': 2\}\] repeats row 1"):
        load_rows(lists)


def test_a_file_changed_after_it_was_read_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q1"}, {"prompt": "q2"}])
    rows = JsonlRows(path)
    assert rows[1] == {"prompt": "q2"}
    write_jsonl(path, [{"prompt": "other"}, {"prompt": "q2"}])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(DataError, match="d.jsonl: changed since the run read it"):
        rows[0]


def test_views_over_several_files_equal_loading_them(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q1", "answer": "1"}, {"prompt": "q2", "answer": "2"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "q3"}], "answer": "3"}])
    prompts = prompt_rows([str(a), str(b)])
    assert len(prompts) == 3 and list(prompts) == load_prompts(a) + load_prompts(b)
    assert prompts[2] == load_prompts(b)[0] and prompts[2].columns["row"] == f"{b}:row 1"
    assert prompts.where(1) == f"{a}:row 2"
    chats = chat_rows([f"{DATA}/arith/train.jsonl", f"{DATA}/helpful/train.jsonl"])
    assert list(chats) == load_chats(f"{DATA}/arith/train.jsonl") + load_chats(f"{DATA}/helpful/train.jsonl")
    assert chats[1500] == load_chats(f"{DATA}/helpful/train.jsonl")[0]


def test_tokenised_per_batch_equals_tokenised_up_front(tokenizer):
    chats = chat_rows([f"{DATA}/arith/train.jsonl"])
    lazy = TokenizedChats(tokenizer, chats, 128)
    eager, stats = tokenize_chats(tokenizer, list(chats), 128, "x")
    assert stats["dropped"] == 0 and len(lazy) == len(eager)
    for i in (0, 7, 1499):
        assert lazy[i] == {**eager[i], "truncated": False}
    # a row cut before its first assistant token stays in the order with nothing to learn (packing drops it)
    cut = TokenizedChats(tokenizer, chats, 6)[0]
    assert cut["truncated"] and all(t == IGNORE for t in cut["labels"])


def test_sft_validates_every_row_before_any_write_and_tokenises_the_first(tiny_dir, tmp_path, tokenizer):
    rows = [chat(f"q{i}", f"a{i}") for i in range(50)] + [{"messages": [{"role": "assistant", "content": "hi"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"output_dir={tmp_path / 'out'}",
                                        f"train_data=[{path}]", "max_steps=1"])
    with pytest.raises(DataError, match=r"d.jsonl:row 51: messages\[0\] is an assistant turn"):
        train_sft(cfg)
    assert not (tmp_path / "out").exists()
    write_jsonl(path, rows[:50])
    train, held, stats = _prepare_data(cfg, tokenizer)
    assert isinstance(train, TokenizedChats) and len(train) == 50 and stats is None and held == []


def test_absurd_step_counts_are_refused_naming_the_key(tiny_dir, tmp_path):
    require_steps(MAX_STEPS, "steps")
    with pytest.raises(ConfigError, match=r"key 'steps' implies 1e\+18 steps \(~1.16e\+13 days at 1 step a second\); "
                                          r"at most 10,000,000 steps are run"):
        require_steps(10**18, "steps")
    with pytest.raises(ConfigError, match=r"key 'epochs' implies more than 1.8e\+308 steps; at most"):
        require_steps(10**400, "epochs")
    grpo = [f"model.path={tiny_dir}", f"output_dir={tmp_path / 'g'}", f"train_data=[{DATA}/arith/rl_prompts.jsonl]",
            "rewards=[{name: exact_answer}]"]
    with pytest.raises(ConfigError, match="key 'steps' implies 1e\\+18 steps"):
        load_config(GRPOConfig, None, [*grpo, "steps=1000000000000000000"])
    with pytest.raises(ConfigError, match="key 'inner_epochs' implies 2e\\+07 steps = steps 1000 x inner_epochs "
                                          "20000 x minibatches 1 updates"):
        load_config(GRPOConfig, None, [*grpo, "steps=1000", "inner_epochs=20000"])
    sft = [f"model.path={tiny_dir}", f"output_dir={tmp_path / 's'}", f"train_data=[{DATA}/arith/train.jsonl]"]
    with pytest.raises(ConfigError, match="key 'max_steps' implies 1e\\+18 steps"):
        load_config(SFTConfig, None, [*sft, "max_steps=1000000000000000000"])
    for epochs, implied in (("1e308", r"more than 1.8e\+308 steps = epochs 1e\+308 x 93"),
                            ("1e6", r"9.3e\+07 steps = epochs 1e\+06 x 93 steps per epoch \(1500 rows / 16 a step\)")):
        with pytest.raises(ConfigError, match=f"key 'epochs' implies ({implied})"):
            train_sft(load_config(SFTConfig, None, [*sft, f"epochs={epochs}", "batch_size=16"]))
    assert not (tmp_path / "s").exists()


def _grpo(tiny_dir, tmp_path, path, *extra):
    return load_config(GRPOConfig, None, [f"model.path={tiny_dir}", f"output_dir={tmp_path / 'g'}",
                                          f"train_data=[{path}]", "rewards=[{name: exact_answer}]", "group_size=2",
                                          "prompts_per_step=2", "steps=1", "sampling.max_new_tokens=8", *extra])


def test_grpo_measures_prompts_up_front_or_when_drawn(tiny_dir, tmp_path, monkeypatch):
    long = {"prompt": "9 " * 600, "answer": "1"}  # ~1200 tokens: beyond the tiny model's 512
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}] * 3 + [long])
    with pytest.raises(ConfigError, match=r"p.jsonl:row 4: prompt of \d+ tokens \+ sampling.max_new_tokens=8 "
                                          r"exceeds the model's context of 512 tokens"):
        loop._checked_inputs(_grpo(tiny_dir, tmp_path, path), 1)
    monkeypatch.setattr(loop, "MEASURED_PROMPTS", 2)  # more prompts than that: each step's, when drawn
    _, rows, _, max_len, _, measured = loop._checked_inputs(_grpo(tiny_dir, tmp_path, path), 1)
    assert not measured and max_len == 512 and len(rows) == 4
    with pytest.raises(ConfigError, match="p.jsonl:row 4: prompt of"):
        loop._prompt_fits(loop.load_tokenizer(tiny_dir), rows[3], _grpo(tiny_dir, tmp_path, path), 512, None)


def test_grpo_reward_columns_are_checked_on_every_row(tiny_dir, tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(30)]
    rows[17]["answer"] = None
    path = write_jsonl(tmp_path / "p.jsonl", rows[:5] + [{"prompt": "x", "answer": "1", "extra": 1}] + rows[5:])
    with pytest.raises(ConfigError, match=r"reward 'exact_answer' needs column 'answer', which .*p.jsonl:row 19 "
                                          r"does not have"):
        loop._checked_inputs(_grpo(tiny_dir, tmp_path, path), 1)
    with pytest.raises(ConfigError, match=r"needs column 'extra', which .*p.jsonl:row 1 does not have"):
        loop._checked_inputs(_grpo(tiny_dir, tmp_path, path, "rewards=[{name: 'tests.test_large_data:needs_extra'}]"),
                             1)


def needs_extra(prompts, completions, extra, **_):
    return [0.0] * len(completions)
