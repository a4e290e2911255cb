"""Users' own data: hub dataset ids (offline, from the datasets cache), column mapping, the named formats (GSM8K,
MATH, HumanEval, MBPP) and their answer / test extraction, text-part message content, and `align eval` on each."""

import json
import shutil
from pathlib import Path

import pytest

from align.cli import main
from align.config import ConfigError, build_config
from align.run.data import DataError, load_chats, load_prompts, load_rows
from align.evaluate import EvalConfig, code_scorer, pass_at_1
from align.run.formats import check_source, gsm8k_answer, last_boxed, parse_source

from .conftest import write_jsonl

GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A car costs 1,200 dollars; two cost?", "answer": "2 * 1200 = <<2*1200=2400>>2400\n#### 2,400"},
    {"question": "Ann owes 5 and pays 8. Balance?", "answer": "5 - 8 = -3\n#### -3"},
    {"question": "How many legs do 3 cats have?", "answer": "3 * 4 = 12\n#### 12"},
]
MATH = [
    {"problem": "What is $1/2 + 0$?", "solution": r"It is $\boxed{\frac{1}{2}}$.", "level": "Level 1"},
    {"problem": "Compute $2+3$.", "solution": r"First \boxed{4}, no: $2+3=\boxed{5}$.", "level": "Level 1"},
    {"problem": "Give the set.", "solution": r"The set is $\boxed{\{1, 2\}}$", "level": "Level 2"},
    {"problem": "Simplify $\\sqrt{4}$.", "solution": r"$\sqrt{4} = \boxed 2$", "level": "Level 1"},
]
HUMANEVAL = [
    {"task_id": "HumanEval/0", "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
     "canonical_solution": "    return a + b\n",
     "test": "METADATA = {}\n\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n"
             "    assert candidate(-1, 1) == 0\n",
     "entry_point": "add"},
    {"task_id": "HumanEval/1", "prompt": "from typing import List\n\n\ndef evens(xs: List[int]) -> List[int]:\n"
                                         '    """The even numbers of xs, in order."""\n',
     "canonical_solution": "    return [x for x in xs if x % 2 == 0]\n",
     "test": "def check(candidate):\n    assert candidate([1, 2, 3, 4]) == [2, 4]\n    assert candidate([]) == []\n",
     "entry_point": "evens"},
]
MBPP = [
    {"task_id": 1, "text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n  return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": ""},
    {"task_id": 2, "text": "Write a function for the area of a circle of radius r.",
     "code": "import math\ndef area(r):\n  return math.pi * r * r",
     "test_list": ["assert math.isclose(area(1), 3.14159, rel_tol=1e-4)", "assert area(0) == 0"],
     "test_setup_code": "import math"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


# -------------------------------------------------------------------------------------------- the formats


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_gsm8k_rows(tmp_path, suffix):
    path = _write(tmp_path / f"gsm8k{suffix}", GSM8K)
    rows = load_prompts(f"{path}#format=gsm8k")
    assert [r.columns["answer"] for r in rows] == ["7", "2400", "-3", "12"]
    assert rows[0].messages == [{"role": "user", "content": GSM8K[0]["question"]}]
    assert rows[1].columns["row"] == f"{path}#format=gsm8k:row 2"
    # the same rows train SFT: the worked solution is the assistant turn
    assert load_chats(f"{path}#format=gsm8k")[0][1] == {"role": "assistant", "content": GSM8K[0]["answer"]}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_math_rows(tmp_path, suffix):
    path = _write(tmp_path / f"math{suffix}", MATH)
    rows = load_prompts(f"{path}#format=math")
    assert [r.columns["answer"] for r in rows] == [r"\frac{1}{2}", "5", r"\{1, 2\}", "2"]
    assert rows[0].messages[0]["content"] == MATH[0]["problem"] and rows[0].columns["level"] == "Level 1"


def test_math_keeps_a_given_answer_column(tmp_path):
    """MATH-500 rows carry `answer`; it is used as is rather than re-extracted."""
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": r"\boxed{x}", "answer": "0.5"}])
    assert load_prompts(f"{path}#format=math")[0].columns["answer"] == "0.5"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_humaneval_rows_give_the_code_rewards_tests(tmp_path, suffix):
    path = _write(tmp_path / f"he{suffix}", HUMANEVAL)
    rows = load_prompts(f"{path}#format=humaneval")
    assert rows[0].columns["tests"] == [HUMANEVAL[0]["test"] + "\n\ncheck(add)\n"]
    prompt = rows[1].messages[0]["content"]
    assert prompt.startswith("Complete the following Python function.") and HUMANEVAL[1]["prompt"] in prompt
    assert rows[1].columns["entry_point"] == "evens"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_mbpp_rows_give_the_code_rewards_tests(tmp_path, suffix):
    path = _write(tmp_path / f"mbpp{suffix}", MBPP)
    rows = load_prompts(f"{path}#format=mbpp")
    assert rows[0].columns["tests"] == MBPP[0]["test_list"]
    assert rows[1].columns["tests"] == ["import math\n" + t for t in MBPP[1]["test_list"]]
    assert "Your code should pass these tests:\nassert add(1, 2) == 3\nassert add(0, 0) == 0" in \
        rows[0].messages[0]["content"]


def test_mbpp_sanitized_rows(tmp_path):
    """The sanitized config names the task `prompt` and the imports `test_imports`."""
    row = {"prompt": "Write area(r).", "code": "import math\ndef area(r):\n  return math.pi * r * r",
           "test_list": ["assert math.isclose(area(1), 3.14159, rel_tol=1e-4)"], "test_imports": ["import math"]}
    rows = load_prompts(f"{write_jsonl(tmp_path / 's.jsonl', [row])}#format=mbpp")
    assert rows[0].messages[0]["content"].startswith("Write area(r).\n")
    assert rows[0].columns["tests"] == ["import math\n" + row["test_list"][0]]


def test_canonical_solutions_pass_and_wrong_ones_fail(tmp_path):
    """The code path end to end without a model: each format's reference solution, as the completion the scorer is
    fed, passes every test (pass@1 = 1); a wrong one passes none."""
    scorer = code_scorer({})
    for name, rows in (("humaneval", HUMANEVAL), ("mbpp", MBPP)):
        source = f"{write_jsonl(tmp_path / f'{name}.jsonl', rows)}#format={name}"
        chats = load_chats(source)
        prompts = load_prompts(source)
        tests = [p.columns["tests"] for p in prompts]
        right = pass_at_1(scorer, [c[-1]["content"] for c in chats], tests)
        assert right == {"pass@1": 1.0, "tests_passed": 1.0, "n": len(rows), "unscored": 0, "timeouts": 0,
                         "scores": [1.0] * len(rows)}
        wrong_code = ("```python\ndef add(a, b):\n    return 0\ndef evens(xs):\n    return xs\n"
                      "def area(r):\n    return -1\n```")
        wrong = pass_at_1(scorer, [wrong_code] * len(rows), tests)
        assert wrong["pass@1"] == 0.0 and wrong["n"] == len(rows)


@pytest.mark.parametrize("text,expected", [
    ("so #### 72", "72"), ("a\n#### 1,000,000", "1000000"), ("#### -3\n", "-3"), ("x #### 1 \n#### 2", "2"),
    ("#### 1,5", "1,5"), ("#### 3.5", "3.5"), ("no final line", None), ("####", None)])
def test_gsm8k_answer(text, expected):
    assert gsm8k_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"), (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{1} and \boxed{2}", "2"), (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{\left\{ x \right\}}", r"\left\{ x \right\}"),
    (r"$\boxed 5$", "5"), (r"\fbox{7}", "7"), (r"\boxed{ 3 }", "3"),
    (r"\boxed{a{b}", None), (r"\boxed{}", None), ("no box", None), (r"\boxed", None)])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("fmt,row,expected", [
    ("gsm8k", {"question": "q", "answer": "just 5"}, r"row 2: field 'answer' has no final '#### <answer>' line"),
    ("gsm8k", {"question": None, "answer": "#### 5"}, r"row 2: field 'question' is missing \(format gsm8k"),
    ("math", {"problem": "p", "solution": r"\boxed{1"}, r"row 2: field 'solution' has no complete \\boxed"),
    ("humaneval", {"prompt": "def f():\n", "test": "assert True", "entry_point": "f"},
     r"row 2: field 'test' defines no check\(candidate\)"),
    ("humaneval", {"prompt": "def f():\n", "test": "def check(c):\n    pass", "entry_point": "f g"},
     r"row 2: field 'entry_point' must be a function name"),
    ("mbpp", {"text": "t", "test_list": []}, r"row 2: field 'test_list' must be a non-empty list"),
])
def test_format_errors_name_the_row_and_field(tmp_path, fmt, row, expected):
    good = {"gsm8k": GSM8K[0], "math": MATH[0], "humaneval": HUMANEVAL[0], "mbpp": MBPP[0]}[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [good, {k: row.get(k) for k in good} | row])
    with pytest.raises(DataError, match=rf"d.jsonl#format={fmt}:{expected}"):
        load_prompts(f"{path}#format={fmt}")


def test_unknown_format_and_option_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GSM8K)
    with pytest.raises(DataError, match=r"unknown format 'gsm9k'; known formats: gsm8k, math, humaneval, mbpp"):
        load_rows(f"{path}#format=gsm9k")
    with pytest.raises(DataError, match=r"option 'split=test' is not format=NAME"):
        load_rows(f"{path}#split=test")


# ------------------------------------------------------------------------------------------ column mapping


def test_columns_map_fields_to_aligns(tmp_path):
    rows = [{"query": "What is 2 + 2?", "gold": "4", "prompt": "stale"},
            {"query": "3 + 3?", "gold": "6", "prompt": "x"}]
    path = write_jsonl(tmp_path / "own.jsonl", rows)
    out = load_prompts(f"{path}#columns=query:prompt+gold:answer")
    assert [(r.messages[0]["content"], r.columns["answer"]) for r in out] == [("What is 2 + 2?", "4"), ("3 + 3?", "6")]
    assert "query" not in out[0].columns and "gold" not in out[0].columns


def test_columns_run_before_the_format(tmp_path):
    """A GSM8K-like dataset with other field names: rename to GSM8K's, then the format extracts the answer."""
    path = write_jsonl(tmp_path / "g.jsonl", [{"q": "How many?", "sol": "2 + 2\n#### 4"}])
    rows = load_prompts(f"{path}#columns=q:question+sol:answer#format=gsm8k")
    assert rows[0].messages[0]["content"] == "How many?" and rows[0].columns["answer"] == "4"


def test_columns_naming_a_missing_field_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "own.jsonl", [{"query": "q", "gold": "1"}])
    with pytest.raises(DataError, match=r"own.jsonl#columns=qury:prompt: key 'columns' maps field 'qury', which "
                                        r"the data do not have \(fields: gold, query\)"):
        load_prompts(f"{path}#columns=qury:prompt")
    with pytest.raises(DataError, match=r"option 'columns' must be FIELD:ALIGN_FIELD"):
        load_prompts(f"{path}#columns=query")


def test_sidecar_and_mapping_forms(tmp_path):
    """A YAML sidecar (usable wherever a file path is: it exists) and the same mapping given in code."""
    _write(tmp_path / "raw.parquet", [{"q": "What is 2 + 2?", "sol": "x\n#### 4"}])
    sidecar = tmp_path / "mine.yaml"
    sidecar.write_text("path: raw.parquet\nformat: gsm8k\ncolumns: {q: question, sol: answer}\n")
    rows = load_prompts(str(sidecar))
    assert rows[0].columns["answer"] == "4" and rows[0].columns["row"] == f"{sidecar}:row 1"
    mapping = {"path": str(tmp_path / "raw.parquet"), "format": "gsm8k", "columns": {"q": "question", "sol": "answer"}}
    assert load_prompts(mapping)[0].columns["answer"] == "4"
    sidecar.write_text("hub: a/b\npath: x.jsonl\n")
    with pytest.raises(DataError, match=r"mine.yaml: a data source mapping needs exactly one of 'hub'"):
        load_rows(sidecar)
    sidecar.write_text("hub: a/b\nsplits: test\n")
    with pytest.raises(DataError, match=r"mine.yaml: unknown key 'splits'"):
        load_rows(sidecar)


# ------------------------------------------------------------------------------------------- hub dataset ids


def _hub_cache(tmp: Path, repo: str, config: str, splits: dict[str, list[dict]]) -> Path:
    """The datasets cache an online `load_dataset(repo, config)` leaves, built without network: a packaged json
    builder prepares the splits (`<name>-<split>.arrow` + dataset_info.json), placed where datasets looks for a hub
    id offline: HF_DATASETS_CACHE/<owner>___<name>/<config>/<version>/<hash>/."""
    from datasets.packaged_modules.json.json import Json

    files = {split: str(write_jsonl(tmp / f"{split}.jsonl", rows)) for split, rows in splits.items()}
    builder = Json(cache_dir=str(tmp / "build"), dataset_name=repo.split("/")[-1], config_name=config,
                   data_files=files, hash="0123456789abcdef")
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    shutil.copytree(built, tmp / "cache" / repo.replace("/", "___") / config / built.parent.name / built.name)
    return tmp / "cache"


@pytest.fixture
def gsm8k_cache(tmp_path, monkeypatch):
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # conftest: HF_HUB_OFFLINE=1, nothing is downloaded
    cache = _hub_cache(tmp_path, "openai/gsm8k", "main", {"train": GSM8K[:3], "test": GSM8K[3:] + GSM8K[:1]})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.chdir(tmp_path)
    return cache


def test_hub_id_loads_from_the_datasets_cache_offline(gsm8k_cache):
    rows = load_prompts("openai/gsm8k:main:test#format=gsm8k")
    assert [r.columns["answer"] for r in rows] == ["12", "7"]
    assert rows[0].columns["row"] == "openai/gsm8k:main:test#format=gsm8k:row 1"
    assert len(load_rows("openai/gsm8k")) == 3  # default config, split train
    assert len(load_rows("openai/gsm8k::test")) == 2
    assert len(load_rows({"hub": "openai/gsm8k", "config": "main", "split": "test[:1]"})) == 1
    assert check_source("openai/gsm8k:main:test") is None


def test_hub_id_errors_name_the_id(gsm8k_cache):
    with pytest.raises(DataError, match=(r"nobody/nothing:main:train: not a local path, and hub dataset "
                                         r"nobody/nothing \(config main, split train\) is not in the datasets "
                                         r"cache .* HF_HUB_OFFLINE=1")):
        load_rows("nobody/nothing:main:train")
    with pytest.raises(DataError, match=r"openai/gsm8k:socratic: .* cannot be loaded .*socratic"):
        load_rows("openai/gsm8k:socratic")
    with pytest.raises(DataError, match=r"openai/gsm8k:main:validation: .* cannot be loaded .*Unknown split"):
        load_rows("openai/gsm8k:main:validation")


def test_local_paths_win_and_missing_ones_stay_local(gsm8k_cache, tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "local", "answer": "1"}]).save_to_disk(str(tmp_path / "openai" / "gsm8k"))
    assert load_prompts("openai/gsm8k")[0].messages[0]["content"] == "local"
    for missing in ("nowhere.jsonl", "some/dir/x", "./gsm8k"):
        assert parse_source(missing).path is not None
        with pytest.raises(DataError, match="data file not found"):
            load_rows(missing)
    assert check_source("nowhere.jsonl") == "data file nowhere.jsonl does not exist"


# ----------------------------------------------------------------------------------------- content parts


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_text_parts_are_joined(tmp_path, suffix):
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]
    rows = [{"messages": [{"role": "user", "content": parts},
                          {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]}]
    path = _write(tmp_path / f"p{suffix}", rows)
    assert load_chats(path) == [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]]
    assert load_prompts(path)[0].messages == [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.mark.parametrize("part,expected", [
    ({"type": "image_url", "image_url": {"url": "x.png"}},
     r"field 'messages\[0\].content\[1\]' is a part of type 'image_url'; only text parts are supported"),
    ({"type": "text", "text": 3}, r"field 'messages\[0\].content\[1\].text' must be a string"),
    ("plain", r"field 'messages\[0\].content' must be a string or a list of text parts"),
    ({"text": "no type"}, r"field 'messages\[0\].content\[1\].type' is missing"),
])
def test_non_text_parts_are_refused(tmp_path, part, expected):
    bad = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, part]},
                        {"role": "assistant", "content": "ok"}]}
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(DataError, match=rf"d.jsonl:row 2: {expected}"):
        load_chats(path)


def test_empty_text_parts_are_empty_content(tmp_path):
    blank = [{"type": "text", "text": " "}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": blank},
                                                            {"role": "assistant", "content": "ok"}]}])
    with pytest.raises(DataError, match=r"row 1: field 'messages\[0\].content' is empty"):
        load_chats(path)


# ------------------------------------------------------------------------------------------------ align eval


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--limit", "4", "--max-new-tokens", "8"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_gsm8k_hub_id_and_humaneval(tiny_dir, tmp_path, gsm8k_cache, capsys):
    code = _write(tmp_path / "he.parquet", HUMANEVAL)
    out = _eval(capsys, str(tiny_dir), "--reasoning", "openai/gsm8k:main:train#format=gsm8k",
                "--code", f"{code}#format=humaneval")
    assert out["counts"] == {"reasoning": 3, "code": 2, "code_timeouts": 0}
    for key in ("eval/accuracy", "eval/rule_pass", "eval/pass@1", "eval/code_tests_passed"):
        assert 0.0 <= out[key] <= 1.0
    assert "eval/helpful_rm" not in out  # no reward model given: skipped, as before


def test_eval_math_and_mbpp(tiny_dir, tmp_path, capsys):
    reasoning = _write(tmp_path / "math.jsonl", MATH)
    code = _write(tmp_path / "mbpp.jsonl", MBPP * 3)
    out = _eval(capsys, str(tiny_dir), "--reasoning", f"{reasoning}#format=math", "--code", f"{code}#format=mbpp",
                "--batch-size", "2")
    assert out["counts"]["reasoning"] == 4 and out["counts"]["code"] == 4
    assert 0.0 <= out["eval/accuracy"] <= 1.0 and 0.0 <= out["eval/pass@1"] <= 1.0


def test_eval_writes_per_problem_predictions_and_never_overwrites(tiny_dir, tmp_path, capsys):
    code = _write(tmp_path / "mbpp.jsonl", MBPP)
    preds = tmp_path / "preds.jsonl"
    out = _eval(capsys, str(tiny_dir), "--code", f"{code}#format=mbpp", "--predictions", str(preds))
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert out["predictions"] == str(preds) and len(rows) == 4 + out["counts"]["code"]  # arithmetic is the default
    assert {r["source"] for r in rows} == {"reasoning", "code"} and all("completion" in r for r in rows)
    assert all(r["score"] in (0.0, 1.0) for r in rows) and "answer" in rows[0] and rows[0]["row"]
    before = preds.read_text()
    assert main(["eval", str(tiny_dir), "--predictions", str(preds)]) == 2
    assert "key 'predictions' must be a new file" in capsys.readouterr().err and preds.read_text() == before


def test_eval_refuses_sources_without_the_needed_column(tiny_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    assert main(["eval", str(tiny_dir), "--code", str(path)]) == 2
    assert f"{path}:row 1: no 'tests' column to run (eval.code)" in capsys.readouterr().err
    assert main(["eval", str(tiny_dir), "--reasoning", "nobody/nothing:x:test"]) == 2
    assert "hub dataset nobody/nothing" in capsys.readouterr().err


def test_eval_config_keys():
    cfg = build_config(EvalConfig, {"reasoning": "r.jsonl", "limit": 8, "max_new_tokens": 16, "code": "c#format=mbpp",
                                    "code_reward": {"wall_s": 5}}, "recipe.yaml", prefix="eval.")
    assert (cfg.limit, cfg.batch_size, cfg.reasoning_reward, cfg.code_reward) == (8, 128, "auto", {"wall_s": 5})
    with pytest.raises(ConfigError, match=r"key 'code_reward' must be settings among wall_s"):
        build_config(EvalConfig, {"code_reward": {"wal_s": 5}}, "recipe.yaml", prefix="eval.")
    with pytest.raises(ConfigError, match=r"key 'eval.reasoning_reward' must be one of"):
        build_config(EvalConfig, {"reasoning_reward": "verify"}, "recipe.yaml", prefix="eval.")


def test_eval_samples_with_a_seed_and_top_k_one_is_greedy(tiny_dir, capsys):
    greedy = _eval(capsys, str(tiny_dir), "--limit", "6")
    assert "sampling" not in greedy
    top1 = _eval(capsys, str(tiny_dir), "--limit", "6", "--temperature", "1.0", "--top-k", "1")
    assert top1["eval/accuracy"] == greedy["eval/accuracy"] and top1["sampling"]["top_k"] == 1
    hot = [_eval(capsys, str(tiny_dir), "--limit", "6", "--temperature", "2.0", "--seed", "3") for _ in range(2)]
    assert hot[0]["eval/accuracy"] == hot[1]["eval/accuracy"] and hot[0]["sampling"]["seed"] == 3  # seeded
    assert main(["eval", str(tiny_dir), "--top-k", "-2"]) == 2
    assert "key 'top_k' must be an integer >= 0" in capsys.readouterr().err
