"""Data loading, validation messages, the assistant-only loss mask, packing."""

import json

import pytest
import torch

from align.run.data import (IGNORE, DataError, collate, collate_packed, load_chats, load_prompts, load_rows, pack,
                        tokenize_chat)

from .conftest import chat, write_jsonl

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"}]


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    ex = tokenize_chat(tokenizer, CONV, 512)
    labelled = tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert labelled == " 5" + tokenizer.eos_token + " 8" + tokenizer.eos_token


def test_changing_a_user_token_changes_no_label(tokenizer):
    a = tokenize_chat(tokenizer, CONV, 512)
    other = [dict(m) for m in CONV]
    other[1]["content"] = "What is 7 + 3?"  # same length in tokens, one digit changed
    b = tokenize_chat(tokenizer, other, 512)
    assert a["input_ids"] != b["input_ids"]
    assert a["labels"] == b["labels"]


def test_prompt_completion_rows_equal_messages(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hi?", "completion": "Hello."}])
    m = write_jsonl(tmp_path / "m.jsonl", [chat("Hi?", "Hello.")])
    assert load_chats(p) == load_chats(m)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "disk"])
def test_formats_load_the_same_rows(tmp_path, suffix):
    import datasets

    rows = [chat(f"q{i}", f"a{i}") for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    assert load_chats(path) == [r["messages"] for r in rows]


def test_jsonl_rows_read_directly_equal_what_datasets_gives(tmp_path):
    """JSONL is read without `datasets` (no Arrow import in a GRPO run); rows with differing keys come out as
    `datasets` gives them: every key on every row, None where a row lacks it."""
    import datasets

    rows = [{"prompt": "q1", "answer": "1", "id": "a"}, {"prompt": "q2", "id": "b"}, {"prompt": "q3", "extra": 2}]
    path = tmp_path / "p.jsonl"
    write_jsonl(path, rows)
    expected = list(datasets.load_dataset("json", data_files=str(path), split="train"))
    assert list(load_rows(path)) == expected
    assert load_rows(path)[1] == {"prompt": "q2", "answer": None, "id": "b", "extra": None}


BAD_ROWS = [
    ({"text": "hi"}, "row 3: missing field 'messages'"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "row 3: field 'messages[0].role' is 'bot'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
     "row 3: field 'messages[0].content' is empty"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
     "row 3: field 'messages[0].content' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "row 3: field 'messages' must end with an assistant"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
     "row 3: field 'messages[0].content' is missing"),
    ({"messages": []}, "row 3: field 'messages' must be a non-empty list"),
]


@pytest.mark.parametrize("bad,expected", BAD_ROWS)
def test_validation_names_file_row_field(tmp_path, bad, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b"), chat("c", "d"), bad])
    with pytest.raises(DataError) as e:
        load_chats(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_one_bad_row_among_a_thousand(tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(1000)]
    rows[736] = {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    with pytest.raises(DataError, match=r"big.jsonl:row 737: field 'messages\[1\].role'"):
        load_chats(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_rows(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text(json.dumps(chat("a", "b")) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON"):
        load_rows(tmp_path / "broken.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:1: not valid UTF-8"):
        load_rows(tmp_path / "latin1.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data format"):
        load_rows(tmp_path / "d.csv")


def test_prompts_from_messages_or_prompt_keep_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{**chat("1+1?", "2"), "answer": "2"}, {"prompt": "2+2?", "answer": "4"}])
    rows = load_prompts(path)
    assert rows[0].messages == [{"role": "user", "content": "1+1?"}]
    assert rows[1].messages == [{"role": "user", "content": "2+2?"}]
    assert rows[1].columns["answer"] == "4" and rows[1].columns["row"].endswith("p.jsonl:row 2")


def test_packing_gives_the_same_logprobs_as_separate_rows(tiny_dir, tokenizer):
    from align.model.logprobs import forward_logprobs
    from align.model.policy import ModelConfig, load_policy

    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    exs = [tokenize_chat(tokenizer, [{"role": "user", "content": f"What is {i} + {i}?"},
                                     {"role": "assistant", "content": f"Answer: {2 * i}"}], 64) for i in (3, 12, 7)]
    packed = pack(exs, 200, tokenizer.pad_token_id)
    assert len(packed) == 1
    pb = collate_packed(packed, tokenizer.pad_token_id)
    lp_packed = forward_logprobs(model, pb["input_ids"], pb["input_ids"].shape[1] - 1,
                                 position_ids=pb["position_ids"]).logprobs[0]
    offset = 0
    for ex in sorted(exs, key=lambda e: -len(e["input_ids"])):
        b = collate([ex], tokenizer.pad_token_id)
        lp = forward_logprobs(model, b["input_ids"], b["input_ids"].shape[1] - 1).logprobs[0]
        n = len(ex["input_ids"])
        assert torch.allclose(lp_packed[offset:offset + n - 1], lp, atol=1e-5)
        offset += n


def test_bundled_arithmetic_splits_share_no_problem():
    """eval.jsonl (heldout.jsonl's 200 rows first) shares no (a, b) with the SFT or RL files, nor do SFT and RL."""
    import re
    from pathlib import Path

    arith = Path(__file__).resolve().parents[1] / "data" / "arith"

    def pairs(name: str) -> list[tuple[int, int]]:
        rows = [json.loads(x) for x in (arith / name).read_text().splitlines()]
        texts = [(r.get("prompt") or r["messages"])[0]["content"] for r in rows]
        return [tuple(map(int, re.findall(r"\d+", t)[:2])) for t in texts]

    ev, held = pairs("eval.jsonl"), pairs("heldout.jsonl")
    train, rl, more = set(pairs("train.jsonl")), set(pairs("rl_prompts.jsonl")), set(pairs("rl_prompts_more.jsonl"))
    assert len(ev) == len(set(ev)) == 1000 and ev[:200] == held
    assert len(more) == 2500
    assert not set(ev) & (train | rl | more)
    assert not train & (rl | more) and not rl & more
