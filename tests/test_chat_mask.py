"""The assistant-only SFT mask on DeepSeek-V2-Chat, Llama-3 and Qwen2.5 chat formats, and templates it refuses.

Each format's template is set on a copy of the tiny tokenizer with the special tokens it needs. The expected text is
written out by hand as pieces, each marked learned or not: the learned pieces of a turn are what the model generates
after the template's generation prompt — the content and the end-of-turn token (and DeepSeek-V2's ' ' after
'Assistant:', which its generation prompt leaves to the model and byte-level BPE merges into the content's first
word). The test checks the template renders exactly that text and that the labelled tokens cover exactly the
learned characters: no token of a system / user turn, a role header or the text between turns, and every content
token and end-of-turn token.
"""

import pytest

from align.run.data import IGNORE, DataError, tokenize_chat, tokenize_chats

DEEPSEEK_V2 = (  # deepseek-ai/DeepSeek-V2-Chat's template
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}")

LLAMA_3 = (  # meta-llama/Meta-Llama-3-8B-Instruct's template
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_2_5 = (  # Qwen/Qwen2.5-7B-Instruct's template without its tool-call branches
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _deepseek(messages):
    """(piece, learned) of DeepSeek-V2-Chat: BOS, system text bare, 'User: ..\\n\\n', 'Assistant:' + ' ..<eos>'."""
    out = [("<｜begin▁of▁sentence｜>", False)]
    for m in messages:
        if m["role"] == "system":
            out.append((m["content"] + "\n\n", False))
        elif m["role"] == "user":
            out.append(("User: " + m["content"] + "\n\n", False))
        else:
            out += [("Assistant:", False), (" " + m["content"] + "<｜end▁of▁sentence｜>", True)]
    return out


def _llama3(messages):
    out = [("<|begin_of_text|>", False)]
    for m in messages:
        out.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
        out.append((m["content"].strip() + "<|eot_id|>", m["role"] == "assistant"))
    return out


def _qwen(messages):
    out = [] if messages[0]["role"] == "system" else [(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n", False)]
    for m in messages:
        out.append((f"<|im_start|>{m['role']}\n", False))
        out.append((m["content"] + "<|im_end|>", m["role"] == "assistant"))
        out.append(("\n", False))
    return out


FORMATS = {
    "deepseek-v2": (DEEPSEEK_V2, [], {}, _deepseek, "<｜end▁of▁sentence｜>"),
    "llama-3": (LLAMA_3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"], {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, _llama3,
                "<|eot_id|>"),
    "qwen2.5": (QWEN_2_5, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], {"eos_token": "<|im_end|>"}, _qwen,
                "<|im_end|>"),
}

SINGLE = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "The answer is 5."}]
SYSTEM = [{"role": "system", "content": "Be brief."}, *SINGLE]
THREE = [{"role": "system", "content": "Answer with a number."},
         {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": "And times 4?"}, {"role": "assistant", "content": "That is 20."},
         {"role": "user", "content": "Minus one, in words?"}, {"role": "assistant", "content": "Nineteen\nis it."}]


def _tokenizer(tiny_dir, template, specials, roles):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    for role, token in roles.items():
        setattr(tok, role, token)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module", params=sorted(FORMATS))
def fmt(request, tiny_dir):
    template, specials, roles, pieces, eot = FORMATS[request.param]
    return _tokenizer(tiny_dir, template, specials, roles), pieces, eot


@pytest.mark.parametrize("messages", [SINGLE, SYSTEM, THREE], ids=["single", "system", "three-turns"])
def test_mask_is_exactly_the_assistant_content_and_end_of_turn(fmt, messages):
    tok, pieces, eot = fmt
    parts = pieces(messages)
    text = "".join(p for p, _ in parts)
    assert tok.apply_chat_template(messages, tokenize=False) == text  # the template renders the format's string
    learned, pos = set(), 0
    for piece, is_learned in parts:
        if is_learned:
            learned |= set(range(pos, pos + len(piece)))
        pos += len(piece)

    ex = tokenize_chat(tok, messages, 4096)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ex["input_ids"] == enc["input_ids"]  # the ids are the whole chat's, unchanged by the mask
    covered = set()
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        chars = set(range(start, end))
        if ex["labels"][t] != IGNORE:
            assert ex["labels"][t] == ex["input_ids"][t]
            assert chars <= learned, f"token {t} {text[start:end]!r} is labelled outside an assistant turn"
            covered |= chars
        else:
            assert not chars & learned, f"token {t} {text[start:end]!r} of an assistant turn is not labelled"
    assert covered == learned
    labelled = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert labelled == "".join(p for p, is_learned in parts if is_learned)
    n_turns = sum(m["role"] == "assistant" for m in messages)
    eot_id = tok.convert_tokens_to_ids(eot)
    assert sum(lab == eot_id for lab in ex["labels"]) == n_turns  # every turn's stop token is learned


def test_hand_checked_learned_text_per_format(tiny_dir):
    want = {"deepseek-v2": " 5<｜end▁of▁sentence｜> That is 20.<｜end▁of▁sentence｜> Nineteen\nis it.<｜end▁of▁sentence｜>",
            "llama-3": "5<|eot_id|>That is 20.<|eot_id|>Nineteen\nis it.<|eot_id|>",
            "qwen2.5": "5<|im_end|>That is 20.<|im_end|>Nineteen\nis it.<|im_end|>"}
    for name, (template, specials, roles, _, _) in FORMATS.items():
        tok = _tokenizer(tiny_dir, template, specials, roles)
        ex = tokenize_chat(tok, THREE, 4096)
        assert tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]) == want[name], name


def test_llama3_trimmed_content_is_found(tiny_dir):
    template, specials, roles, _, _ = FORMATS["llama-3"]
    tok = _tokenizer(tiny_dir, template, specials, roles)
    ex = tokenize_chat(tok, [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "  ok then \n"}],
                       4096)
    assert tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]) == "ok then<|eot_id|>"


def test_qwen_default_system_prompt_is_not_learned(tiny_dir):
    template, specials, roles, _, _ = FORMATS["qwen2.5"]
    tok = _tokenizer(tiny_dir, template, specials, roles)
    ex = tokenize_chat(tok, SINGLE, 4096)
    text = tok.decode(ex["input_ids"])
    assert text.startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n")
    labelled = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert labelled == "The answer is 5.<|im_end|>"


REFUSED = {
    # the last message is marked: an earlier turn renders differently once later ones follow
    "changes earlier turns": (DEEPSEEK_V2.replace("{{ 'Assistant: ' + message['content'] + eos_token }}",
                                                  "{{ 'Assistant: ' }}{% if loop.last %}(last) {% endif %}"
                                                  "{{ message['content'] + eos_token }}"),
                              r"does not render the conversation up to messages\[2\] as a prefix"),
    # no generation prompt: the role header would be learned
    "header outside the generation prompt": (DEEPSEEK_V2.replace("{{ 'Assistant:' }}", ""),
                                             r"renders assistant turn messages\[2\] as 'Assistant: 5"),
    "content altered": (DEEPSEEK_V2.replace("'Assistant: ' + message['content']",
                                            "'Assistant: ' + message['content'] | upper"),
                        r"not as optional whitespace then the content 'That is 20.'"),
    "no end-of-turn token": (DEEPSEEK_V2.replace("message['content'] + eos_token", "message['content'] + '\\n\\n'"),
                             r"ends assistant turn messages\[2\] with '\\n\\n', not with a special token"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_templates_the_mask_cannot_be_derived_for_are_refused_by_name(tiny_dir, case):
    template, match = REFUSED[case]
    tok = _tokenizer(tiny_dir, template, [], {})
    with pytest.raises(DataError, match=match) as e:
        tokenize_chat(tok, THREE, 4096)
    assert f"the chat template of tokenizer {tiny_dir}" in str(e.value)


def test_refusals_name_the_row(tokenizer):
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match=r"^d.jsonl:row 2: messages\[0\] is an assistant turn"):
        tokenize_chats(tokenizer, [ok, [{"role": "assistant", "content": "hello"}]], 64, "d.jsonl")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_rollouts_stop_at_the_end_of_turn_token_sft_teaches(tiny_dir, name):
    """Llama-3 with EOS <|end_of_text|> ends turns with <|eot_id|>: both stop a completion (else GRPO samples past
    the turn SFT taught the model to end)."""
    from align.run.data import stop_token_ids

    template, specials, roles, _, eot = FORMATS[name]
    tok = _tokenizer(tiny_dir, template, specials, {**roles, "eos_token": "<|end_of_text|>"} if name == "llama-3"
                     else roles)
    ids = stop_token_ids(tok)
    assert ids[0] == tok.eos_token_id and tok.convert_tokens_to_ids(eot) in ids and len(set(ids)) == len(ids)


def test_model_chat_template_replaces_the_tokenizers_and_is_checked(tiny_dir, tmp_path):
    """model.chat_template: Jinja text or a file; bad Jinja, a missing file and a template that fails to render are
    refused naming the key; the template is what the stage's tokenizer renders and saves."""
    from align.config import ConfigError
    from align.model.policy import ModelConfig, load_tokenizer

    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    tok = load_tokenizer(tiny_dir, DEEPSEEK_V2)
    assert tok.apply_chat_template(chat, tokenize=False) == f"{tok.bos_token}User: 2+2?\n\nAssistant: 4{tok.eos_token}"
    path = tmp_path / "t.jinja"
    path.write_text(DEEPSEEK_V2)
    assert load_tokenizer(tiny_dir, str(path)).chat_template == DEEPSEEK_V2
    tok.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").chat_template == DEEPSEEK_V2   # later stages read it back
    for value, message in (("{% for m in messages %}", "is not valid Jinja"),
                           (str(tmp_path / "missing.jinja"), "a template file or Jinja text"),
                           ("{{ raise_exception('no') }}", "rendering a user / assistant chat failed")):
        with pytest.raises(ConfigError, match="model.chat_template.*" + message):
            ModelConfig(path=str(tiny_dir), chat_template=value).validate()
            load_tokenizer(tiny_dir, value)
