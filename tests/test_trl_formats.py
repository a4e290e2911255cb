"""Formats TRL users bring (issue 39 item 5): tool calls and tool messages in SFT chats, implicit-prompt preference
pairs, `#format=` hints, over-long GRPO prompts, `model.path` for `align rm`, rewards from the working directory, a
classifier refused as a policy, and what `align run --check` probes."""

import json
import shutil

import pytest

from align.run.data import IGNORE, DataError, load_chats, tokenize_chat

from .conftest import write_jsonl
from .test_hub import hub  # noqa: F401 (a hub cache in tmp with acme/tiny-dsv2)

# Qwen/Qwen2.5-7B-Instruct's template, its assistant / tool branches as written there (no tools list, no default
# system prompt)
QWEN_TOOLS = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CALL = {"type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}
TOOL_CHAT = [{"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "name": "add", "content": "5"},
             {"role": "assistant", "content": "It is 5."}]


@pytest.fixture(scope="module")
def qwen(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN_TOOLS
    return tok


def _learned(tok, ex) -> str:
    return tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])


# ------------------------------------------------------------------------------------------------ tool chats


def test_tool_chat_rows_load_with_arguments_parsed(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": TOOL_CHAT}])
    (chat,) = load_chats(path)
    assert chat[1] == {"role": "assistant", "content": "",
                       "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
    assert chat[2] == {"role": "tool", "content": "5", "name": "add"}


def test_tool_chat_mask_learns_the_calls_and_answer_never_the_tool_message(qwen):
    msgs = load_chats_from(TOOL_CHAT)
    ex = tokenize_chat(qwen, msgs, 4096)
    text = qwen.decode(ex["input_ids"])
    assert text == ("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                    "<|im_start|>assistant\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}\n"
                    "</tool_call><|im_end|>\n"
                    "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\nIt is 5.<|im_end|>\n")
    # the learned text: the call and the answer, each with its end-of-turn token; nothing of the tool message ('5'
    # inside <tool_response>), the headers or the text between turns
    assert _learned(qwen, ex) == ("<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}\n"
                                  "</tool_call><|im_end|>It is 5.<|im_end|>")


def load_chats_from(messages):
    from align.run.data import row_messages

    return row_messages({"messages": messages}, "t.jsonl:row 1")


def test_templates_without_tool_formats_are_refused(tiny_dir, tokenizer):
    msgs = load_chats_from(TOOL_CHAT)
    with pytest.raises(DataError, match=r"does not render the tool calls of assistant message messages\[1\] "
                                        r"\(no 'add'"):
        tokenize_chat(tokenizer, msgs, 4096)  # the tiny (DeepSeek-V2) template has no tool-call format
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_TOOLS.replace("{{- message.content }}{{- '\\n</tool_response>' }}",
                                           "{{- '\\n</tool_response>' }}")  # drops what the tool said
    with pytest.raises(DataError, match=r"does not render tool message messages\[2\]"):
        tokenize_chat(tok, msgs, 4096)


BAD_TOOL_ROWS = [
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "5"}, {"role": "assistant", "content": "y"}],
     r"field 'messages\[1\]' is a tool message that answers no call"),
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}, {"role": "assistant", "content": "y"}],
     r"field 'messages\[0\].tool_calls' is on a 'user' message"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{a: 2"}}]},
      {"role": "tool", "content": "5"}, {"role": "assistant", "content": "y"}],
     r"field 'messages\[1\].tool_calls\[0\].function.arguments' is a string that is not JSON"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]},
      {"role": "tool", "content": "5"}, {"role": "assistant", "content": "y"}],
     r"field 'messages\[1\].tool_calls\[0\].function.name' must be a non-empty string"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": []}, {"role": "assistant", "content": "y"}],
     r"field 'messages\[1\].tool_calls' must be a non-empty list"),
]


@pytest.mark.parametrize("messages,expected", BAD_TOOL_ROWS)
def test_bad_tool_rows_are_named(tmp_path, messages, expected):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": TOOL_CHAT}, {"messages": messages}])
    with pytest.raises(DataError, match=rf"t.jsonl:row 2: {expected}"):
        load_chats(path)


# ------------------------------------------------------------------------------------------- #format= hints


@pytest.mark.parametrize("row,hint", [
    ({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}, "'#format=gsm8k'"),
    ({"problem": "2 + 3?", "solution": "\\boxed{5}"}, "'#format=math'"),
    ({"text": "Add.", "test_list": ["assert f() == 1"], "code": "def f(): return 1"}, "'#format=mbpp'"),
    ({"prompt": "def f():", "test": "def check(c): pass", "entry_point": "f"}, "'#format=humaneval'"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "a preference pair's: pairs train a reward model (align rm)"),
])
def test_rows_shaped_like_a_known_dataset_name_the_format(tmp_path, row, hint):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    expected = r"d.jsonl:row 1: (missing field 'messages'|field 'completion' is missing)"
    with pytest.raises(DataError, match=expected) as e:
        load_chats(path)
    assert hint in str(e.value)


def test_prompt_rows_shaped_like_gsm8k_name_the_format_and_others_get_no_hint(tmp_path):
    from align.run.data import load_prompts

    with pytest.raises(DataError, match=r"missing field 'prompt' \(or 'messages'\); its fields answer, question are "
                                        r"those of gsm8k rows: read the source with '#format=gsm8k'"):
        load_prompts(write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a\n#### 1"}]))
    with pytest.raises(DataError) as e:
        load_chats(write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}]))
    assert str(e.value).endswith("missing field 'messages' (or 'prompt' + 'completion')")  # nothing to suggest


# ------------------------------------------------------------------------------------ preference pairs (rm)

U = {"role": "user", "content": "What is 2 + 3?"}
SYS = {"role": "system", "content": "Be brief."}


def _a(text):
    return {"role": "assistant", "content": text}


def test_implicit_prompt_pairs_are_the_shared_prefix(tmp_path, tokenizer):
    from align.rm import load_pairs

    rows = [{"chosen": [SYS, U, _a("5")], "rejected": [SYS, U, _a("6")]},                  # TRL implicit prompt
            {"prompt": U["content"], "chosen": [U, _a("5")], "rejected": [U, _a("6")]},  # ultrafeedback-binarized
            {"prompt": [U], "chosen": "5", "rejected": "6"}]                               # explicit, as before
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    assert pairs[0] == (f"{bos}Be brief.\n\nUser: What is 2 + 3?\n\nAssistant: 5{eos}",
                        f"{bos}Be brief.\n\nUser: What is 2 + 3?\n\nAssistant: 6{eos}")
    assert pairs[1] == pairs[2] == (f"{bos}User: What is 2 + 3?\n\nAssistant: 5{eos}",
                                    f"{bos}User: What is 2 + 3?\n\nAssistant: 6{eos}")


@pytest.mark.parametrize("row,expected", [
    ({"chosen": [U, _a("5")], "rejected": [SYS, U, _a("6")]},
     r"fields 'chosen' and 'rejected' begin with different messages, so there is no implicit prompt"),
    ({"chosen": [U, _a("5")], "rejected": [U]}, r"field 'rejected' has nothing after the prompt it shares"),
    ({"prompt": "Another question?", "chosen": [U, _a("5")], "rejected": [U, _a("6")]},
     r"field 'prompt' is not the end of the messages 'chosen' and 'rejected' begin with"),
    ({"chosen": "5", "rejected": "6"}, r"missing field 'prompt' \(without it, 'chosen' and 'rejected' must be whole"),
    ({"messages": [U, _a("5")]}, r"missing field 'chosen'"),
])
def test_bad_preference_rows_are_refused_by_row(tmp_path, tokenizer, row, expected):
    from align.rm import load_pairs

    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": [U, _a("5")], "rejected": [U, _a("6")]}, row])
    with pytest.raises(DataError, match=rf"p.jsonl:row 2: {expected}"):
        load_pairs(path, tokenizer)


def test_rm_takes_model_path_and_refuses_model_naming_it(tmp_path):
    from align.config import ConfigError, load_config
    from align.rm import RMConfig

    base = [f"output_dir={tmp_path}/o", "train_data=[p.jsonl]"]
    assert load_config(RMConfig, None, ["model.path=/m", "model.dtype=bfloat16", *base]).model.path == "/m"
    with pytest.raises(ConfigError, match=r"key 'model' is a mapping \(path, dtype, chat_template\); write model.path=/m "):
        load_config(RMConfig, None, ["model=/m", *base])


def test_rm_runs_recorded_with_the_old_model_key_still_match():
    from align.run.rundir import comparable

    assert comparable({"model": "/m", "model.config_sha256": "h", "lr": 1.0}) == {
        "model.path": "/m", "model.config_sha256": "h", "lr": 1.0}          # an identity (align-run.json)
    assert comparable({"model": "/m", "lr": 1.0}) == {"model": {"path": "/m", "dtype": "auto"}, "lr": 1.0}  # a record


# --------------------------------------------------------------------------------- over-long GRPO prompts


def _grpo(tiny_dir, tmp_path, *extra):
    from align.config import load_config
    from align.grpo.config import GRPOConfig

    return load_config(GRPOConfig, None, [f"model.path={tiny_dir}", f"output_dir={tmp_path}/o", "train_data=[p]",
                                          "rewards=[{name: exact_answer}]", "sampling.max_new_tokens=8", *extra])


def _row(*messages):
    from align.run.data import PromptRow

    return PromptRow(list(messages), {"row": "p.jsonl:row 1"})


def test_truncate_keeps_the_end_of_the_prompt(tokenizer):
    from align.grpo.loop import _prompt_tokens, truncate_prompt

    overhead = _prompt_tokens(tokenizer, _row({"role": "user", "content": "9"})) - 1
    digits = {"role": "user", "content": "0123456789"}
    assert _prompt_tokens(tokenizer, _row(digits)) == overhead + 10  # one token per digit
    cut = truncate_prompt(tokenizer, _row(SYS, digits), overhead + 4)
    assert cut.messages == [{"role": "user", "content": "6789"}]  # the system message left out, the question's end kept
    assert truncate_prompt(tokenizer, _row(digits), overhead) is None  # no room for any content


@pytest.mark.parametrize("mode,kept,counts", [("drop", 2, (1, 0)), ("truncate", 3, (0, 1))])
def test_overlong_prompts_drop_or_truncate_with_a_count(tiny_dir, tmp_path, tokenizer, mode, kept, counts):
    from align.grpo.loop import _fit_prompts, _prompt_tokens

    rows = [_row({"role": "user", "content": "1 + 1?"}), _row({"role": "user", "content": "7" * 600}),
            _row({"role": "user", "content": "2 + 2?"})]
    fitted, n, longest = _fit_prompts(_grpo(tiny_dir, tmp_path, f"overlong_prompts={mode}"), tokenizer, rows, 512,
                                      None)
    assert len(fitted) == kept and (n["data/prompts_dropped"], n["data/prompts_truncated"]) == counts
    if mode == "truncate":  # cut to exactly the room left: 512 - 8 new tokens
        assert _prompt_tokens(tokenizer, fitted[1]) == longest == 504 and fitted[1].messages[0]["content"] == "7" * (
            504 - (_prompt_tokens(tokenizer, rows[1]) - 600))


def test_overlong_prompts_refuse_names_the_row_and_the_key(tiny_dir, tmp_path, tokenizer):
    from align.config import ConfigError
    from align.grpo.loop import _fit_prompts

    with pytest.raises(ConfigError, match=r"p.jsonl:row 1: prompt of \d+ tokens \+ sampling.max_new_tokens=8 exceeds "
                                          r"the model's context of 512 tokens \(overlong_prompts=refuse; drop or"):
        _fit_prompts(_grpo(tiny_dir, tmp_path), tokenizer, [_row({"role": "user", "content": "7" * 600})], 512, None)
    with pytest.raises(ConfigError, match=r"key 'overlong_prompts' must be one of \['refuse', 'drop', 'truncate'\]"):
        _grpo(tiny_dir, tmp_path, "overlong_prompts=filter")


# ----------------------------------------------------------------------- rewards from the working directory


def test_module_function_rewards_are_found_in_the_working_directory(tmp_path, monkeypatch):
    import sys

    from rewards.registry import get_reward

    (tmp_path / "f39_cwd_rewards.py").write_text("def length(prompts, completions, **kw):\n"
                                                 "    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "f39_cwd_rewards", raising=False)
    fn = get_reward("f39_cwd_rewards:length")
    assert fn(["p"], ["abc"]) == [3.0] and sys.path[-1] == str(tmp_path)  # appended: never shadows an install
    with pytest.raises(KeyError, match=rf"cannot import 'nope' from 'f39_missing_mod' .*working directory {tmp_path}"):
        get_reward("f39_missing_mod:nope")
    sys.modules.pop("f39_cwd_rewards", None)


# ------------------------------------------------------------------------------ a classifier is not a policy


def test_a_reward_model_directory_is_refused_as_a_policy(tiny_dir, tmp_path, capsys):
    from align.cli import main
    from align.config import ConfigError
    from align.model.policy import check_model_dir

    rm = tmp_path / "rm"
    rm.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**cfg, "architectures": ["DeepseekV2ForSequenceClassification"]}))
    shutil.copy(tiny_dir / "model.safetensors", rm)  # the refusal below comes from config.json alone
    assert check_model_dir(rm)["architectures"] == ["DeepseekV2ForSequenceClassification"]  # fine as a reward model
    with pytest.raises(ConfigError, match=r"is a classifier \(DeepseekV2ForSequenceClassification in its config.json "
                                          r"architectures\), such as a reward model from align rm, not a policy"):
        check_model_dir(rm, policy=True)
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [U, _a("5")]}])
    assert main(["sft", f"model.path={rm}", f"output_dir={tmp_path}/out", f"train_data=[{data}]"]) == 2
    assert "is a classifier" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert check_model_dir(tiny_dir, policy=True)["architectures"] == ["DeepseekV2ForCausalLM"]


# -------------------------------------------------------------------------------------- align run --check


def test_judge_probe_tells_a_listening_server_from_none():
    import http.server
    import socket
    import threading

    from rewards.judge import unreachable

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501 to GET
    threading.Thread(target=server.handle_request, daemon=True).start()
    assert unreachable(f"http://127.0.0.1:{server.server_port}/v1") is None
    server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    assert "Connection refused" in unreachable(f"http://127.0.0.1:{port}/v1", timeout_s=2)


def test_check_reports_an_uncached_hub_model_and_an_unreachable_judge(tmp_path, monkeypatch, capsys):
    import socket

    from huggingface_hub import constants

    from align.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path}/run\nstages:\n  grpo:\n    kind: grpo\n"
                      f"    model: {{path: acme/not-cached}}\n    train_data: [\"{{data}}/arith/rl_prompts.jsonl\"]\n"
                      f"    rewards: [{{name: judge, args: {{url: \"http://127.0.0.1:{port}/v1\", model: m}}}}]\n")
    assert main(["run", str(recipe), "--check"]) == 2
    out = capsys.readouterr()
    assert ("error: key 'stages.grpo.model.path': hub model acme/not-cached at revision main is not in the hub cache "
            f"{tmp_path / 'hub'}, and HF_HUB_OFFLINE=1 forbids downloading it") in out.err
    assert (f"warning: key 'stages.grpo.rewards[0].args.url': the judge does not answer "
            f"(http://127.0.0.1:{port}/v1/chat/completions: [Errno 111] Connection refused)") in out.err
    assert out.out.startswith(f"{recipe}: not runnable here (1 error above); stages grpo")
    assert not (tmp_path / "run").exists()


def test_check_passes_a_cached_hub_model(hub, tmp_path, capsys):
    from align.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path}/run\nstages:\n  sft:\n    kind: sft\n    model: {{path: acme/tiny-dsv2}}\n"
                      f"    train_data: [\"{{data}}/arith/train.jsonl\"]\n")
    assert main(["run", str(recipe), "--check"]) == 0
    assert capsys.readouterr().out.startswith(f"{recipe}: valid; stages sft")
