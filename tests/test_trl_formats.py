"""Formats TRL users bring (issue 39 item 5): tool calls and tool messages in SFT chats, implicit-prompt preference
pairs, `#format=` hints, over-long GRPO prompts, `model.path` for `align rm`, rewards from the working directory, a
classifier refused as a policy, and what `align run --check` probes."""

import json

import pytest

from align.run.data import IGNORE, DataError, load_chats, tokenize_chat

from .conftest import write_jsonl

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
    with pytest.raises(DataError, match=r"does not render the tool calls of assistant message messages\[1\] \(no 'add'"):
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
