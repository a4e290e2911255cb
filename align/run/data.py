"""Chat data: load (JSONL, JSON, Parquet, `save_to_disk` directories, hub dataset ids: `align.run.formats`), validate,
tokenise.

Rows are either conversational, `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}`
(content may be a list of text parts, joined with no separator), or prompt / completion, `{"prompt": str | messages,
"completion": str | messages}`. Tool use as transformers' chat templates take it: an assistant message may carry
`tool_calls: [{"type": "function", "function": {"name": str, "arguments": {...} | JSON string}}]` (content then
optional; arguments given as a JSON string are parsed to the object templates expect), answered by `tool` messages
(`content`, optional `name` / `tool_call_id`) that follow it. Validation runs over every row before any training and
names `file:row N: field`; a row that fails it for want of `messages` / `prompt` but whose fields are those of a known
dataset says which `#format=` reads it (`formats.format_hint`). Rows are then read again as they are drawn
(`RowView`: a JSONL file is an index of where rows start, `align.run.datafiles.JsonlRows`), and SFT tokenises them per
batch (`TokenizedChats`). Tokenisation renders the whole chat with the tokenizer's own template and labels each
assistant turn's content (and tool calls) and its end-of-turn token (found by rendering the prefix with and without
the turn; a template it cannot be found in, or that drops tool calls or tool messages, is refused by name), so the
loss is on assistant tokens only: tool messages are never learned.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .datafiles import DataError  # noqa: F401 (re-exported: align.run.data.DataError)
from .formats import format_hint, load_rows, source_name  # noqa: F401 (load_rows re-exported: align.run.data.load_rows)

ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100


# ------------------------------------------------------------------------------------------------- validation


def content_text(content, where: str, field: str) -> str:
    """A message's content as text: a string as is, a list of text parts joined with no separator. Non-text parts
    and malformed ones raise DataError naming the field."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        got = f"{content!r:.80}" if isinstance(content, list) else type(content).__name__
        raise DataError(f"{where}: field '{field}' must be a string or a list of text parts "
                        f"([{{\"type\": \"text\", \"text\": ...}}]), got {got}")
    texts = []
    for j, part in enumerate(content):
        f = f"{field}[{j}]"
        if not isinstance(part.get("type"), str):
            raise DataError(f"{where}: field '{f}.type' is missing (a part is {{\"type\": \"text\", \"text\": ...}})")
        if part["type"] != "text":
            raise DataError(f"{where}: field '{f}' is a part of type {part['type']!r}; only text parts are "
                            f"supported (align trains and samples on text)")
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}: field '{f}.text' must be a string, got {type(part.get('text')).__name__}")
        texts.append(part["text"])
    return "".join(texts)


def _check_tool_calls(calls, where: str, field: str) -> None:
    """An assistant message's `tool_calls`: a non-empty list of {type: function, function: {name, arguments}}."""
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of tool calls "
                        f"([{{\"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": {{...}}}}}}]), "
                        f"got {calls!r:.80}")
    for j, call in enumerate(calls):
        f = f"{field}[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise DataError(f"{where}: field '{f}.function' is missing (a tool call is {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ..., \"arguments\": {{...}}}}}}), got {call!r:.80}")
        if call.get("type") not in (None, "function"):
            raise DataError(f"{where}: field '{f}.type' is {call['type']!r}; only function calls are supported")
        name = call["function"].get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: field '{f}.function.name' must be a non-empty string, got {name!r}")
        _arguments(call["function"].get("arguments"), where, f"{f}.function.arguments")


def _arguments(value, where: str, field: str) -> dict:
    """A tool call's arguments as the object chat templates render: a mapping, or a JSON string of one (OpenAI's
    form), parsed; missing: {}."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field '{field}' is a string that is not JSON ({e}); arguments are an object "
                            f"or a JSON string of one") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: field '{field}' must be an object (or a JSON string of one), got {value!r:.80}")
    return value


def _check_messages(messages, where: str, field: str, need_assistant_last: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages, got {messages!r:.80}")
    for i, m in enumerate(messages):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{f}' must be an object with role and content, got {m!r:.80}")
        if "role" not in m or m["role"] is None:
            raise DataError(f"{where}: field '{f}.role' is missing")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{f}.role' is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if m.get("tool_calls") is not None:
            if m["role"] != "assistant":
                raise DataError(f"{where}: field '{f}.tool_calls' is on a {m['role']!r} message; only assistant "
                                f"messages call tools")
            _check_tool_calls(m["tool_calls"], where, f"{f}.tool_calls")
            if m.get("content") is not None:
                content_text(m["content"], where, f"{f}.content")  # may be empty beside the calls
            continue
        if m["role"] == "tool":
            before = next((p for p in reversed(messages[:i]) if p.get("role") != "tool"), None)
            if before is None or before.get("role") != "assistant" or before.get("tool_calls") is None:
                raise DataError(f"{where}: field '{f}' is a tool message that answers no call: it must follow an "
                                f"assistant message with tool_calls (or another tool message)")
            for key in ("name", "tool_call_id"):
                if m.get(key) is not None and not isinstance(m[key], str):
                    raise DataError(f"{where}: field '{f}.{key}' must be a string, got {m[key]!r:.80}")
        if "content" not in m or m["content"] is None:
            raise DataError(f"{where}: field '{f}.content' is missing")
        if not content_text(m["content"], where, f"{f}.content").strip() and m["role"] != "tool":
            raise DataError(f"{where}: field '{f}.content' is empty")
    if need_assistant_last and messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{field}' must end with an assistant message, ends with "
                        f"{messages[-1]['role']!r}")


def _plain(messages: list[dict], where: str, field: str) -> list[dict]:
    """Checked messages as {role, content: str} (a list of text parts joined: `content_text`), with an assistant
    message's tool calls ({type, function: {name, arguments: dict}}, ids kept) and a tool message's name and
    tool_call_id where given."""
    out = []
    for i, m in enumerate(messages):
        f = f"{field}[{i}]"
        msg = {"role": m["role"], "content": "" if m.get("content") is None else content_text(m["content"], where,
                                                                                              f"{f}.content")}
        if m.get("tool_calls") is not None:
            msg["tool_calls"] = [
                {**({"id": c["id"]} if c.get("id") is not None else {}), "type": "function",
                 "function": {"name": c["function"]["name"],
                              "arguments": _arguments(c["function"].get("arguments"), where,
                                                      f"{f}.tool_calls[{j}].function.arguments")}}
                for j, c in enumerate(m["tool_calls"])]
        msg.update({k: m[k] for k in ("name", "tool_call_id") if m["role"] == "tool" and m.get(k) is not None})
        out.append(msg)
    return out


def as_messages(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is empty")
        return [{"role": role, "content": value}]
    if value is None:
        raise DataError(f"{where}: field '{field}' is missing")
    _check_messages(value, where, field, need_assistant_last=False)
    return _plain(value, where, field)


def row_messages(row: dict, where: str) -> list[dict]:
    """The full conversation of a training row (validated); raises DataError naming the field (and the `#format=`
    that reads the row, when it looks like a known dataset's)."""
    if row.get("messages") is not None:
        _check_messages(row["messages"], where, "messages", need_assistant_last=True)
        return _plain(row["messages"], where, "messages")
    if row.get("prompt") is not None and row.get("completion") is None:
        raise DataError(f"{where}: field 'completion' is missing (a training row is 'messages' or 'prompt' + "
                        f"'completion'){format_hint(row)}")
    if row.get("prompt") is not None or row.get("completion") is not None:
        prompt = as_messages(row.get("prompt"), "user", where, "prompt")
        completion = as_messages(row.get("completion"), "assistant", where, "completion")
        if completion[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'completion' must end with an assistant message")
        return prompt + completion
    raise DataError(f"{where}: missing field 'messages' (or 'prompt' + 'completion'){format_hint(row)}")


def row_prompt(row: dict, where: str) -> list[dict]:
    """The prompt of a row for generation: `prompt`, or `messages` without its final assistant turn."""
    if row.get("prompt") is not None:
        return as_messages(row["prompt"], "user", where, "prompt")
    if row.get("messages") is not None:
        _check_messages(row["messages"], where, "messages", need_assistant_last=False)
        msgs = _plain(row["messages"], where, "messages")
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise DataError(f"{where}: field 'messages' has no prompt before the assistant turn")
        return msgs
    raise DataError(f"{where}: missing field 'prompt' (or 'messages'){format_hint(row)}")


def row_pair(row: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of a preference row (validated). Explicit: `{prompt, chosen, rejected}`,
    each a string or messages. Implicit (TRL's, as in ultrafeedback-binarized): `chosen` and `rejected` are whole
    conversations and the prompt is the messages both begin with; a row whose two conversations share no first
    message is refused. A `prompt` beside whole conversations (ultrafeedback-binarized repeats the user turn as a
    string) must be the end of that shared prefix."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise DataError(f"{where}: missing field '{key}' (a preference row is prompt / chosen / rejected, or "
                            f"chosen / rejected conversations that begin with the same prompt){format_hint(row)}")
    whole = all(isinstance(row[k], list) and row[k] and isinstance(row[k][0], dict)
                and row[k][0].get("role") not in (None, "assistant") for k in ("chosen", "rejected"))
    if not whole:
        if row.get("prompt") is None:
            raise DataError(f"{where}: missing field 'prompt' (without it, 'chosen' and 'rejected' must be whole "
                            f"conversations that begin with the prompt){format_hint(row)}")
        return (as_messages(row["prompt"], "user", where, "prompt"),
                as_messages(row["chosen"], "assistant", where, "chosen"),
                as_messages(row["rejected"], "assistant", where, "rejected"))
    chosen, rejected = (as_messages(row[k], "assistant", where, k) for k in ("chosen", "rejected"))
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' begin with different messages, so there is no "
                        f"implicit prompt (the messages both begin with); give the prompt in a 'prompt' field and "
                        f"only the responses in 'chosen' / 'rejected'")
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if n == len(side):
            raise DataError(f"{where}: field '{key}' has nothing after the prompt it shares with the other side "
                            f"({n} messages): no response to compare")
    prompt = chosen[:n]
    if row.get("prompt") is not None:
        given = as_messages(row["prompt"], "user", where, "prompt")
        if prompt[-len(given):] != given:
            raise DataError(f"{where}: field 'prompt' is not the end of the messages 'chosen' and 'rejected' begin "
                            f"with (their last shared message: {prompt[-1]['content'][:60]!r})")
    return prompt, chosen[n:], rejected[n:]


@dataclass
class PromptRow:
    """One prompt for generation, with the row's other columns (passed to reward functions)."""

    messages: list[dict]
    columns: dict


def prompt_row(row: dict, where: str) -> PromptRow:
    """The PromptRow of a row (validated); its columns get `row` = `where` unless the row has one."""
    msgs = row_prompt(row, where)
    columns = {k: v for k, v in row.items() if k not in ("messages", "prompt", "completion")}
    columns.setdefault("row", where)
    return PromptRow(msgs, columns)


class RowView(Sequence):
    """The rows of one data source as `convert(row, "source:row N")` makes them (`row_messages`, `prompt_row`),
    made when asked for: nothing of a row is kept between reads (a JSONL file is read from disk again,
    `align.run.datafiles.JsonlRows`; a Dataset is memory-mapped Arrow), so a 200 MB file costs its index, not its
    rows' Python objects. Iterating converts every row in order: the validation pass."""

    def __init__(self, source, convert: Callable[[dict, str], Any]):
        self.rows, self.name, self.convert = load_rows(source), source_name(source), convert

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        return f"{self.name}:row {i + 1}"

    def __getitem__(self, i: int):
        return self.convert(self.rows[i], self.where(i))

    def __iter__(self):
        for i, row in enumerate(self.rows):
            yield self.convert(row, self.where(i))


class Chain(Sequence):
    """Several RowViews as one sequence, in order (a stage's train_data files)."""

    def __init__(self, views: list[RowView]):
        self.views = views
        self.ends = list(itertools.accumulate(len(v) for v in views))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def _locate(self, i: int) -> tuple[RowView, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        k = bisect.bisect_right(self.ends, i)
        return self.views[k], i - (self.ends[k - 1] if k else 0)

    def where(self, i: int) -> str:
        view, j = self._locate(i)
        return view.where(j)

    def __getitem__(self, i: int):
        view, j = self._locate(i)
        return view[j]

    def __iter__(self):
        return itertools.chain.from_iterable(self.views)


def chat_rows(sources: list) -> Chain:
    """The conversations of `sources`, read and validated as they are asked for (`RowView`)."""
    return Chain([RowView(s, row_messages) for s in sources])


def prompt_rows(sources: list) -> Chain:
    """The PromptRows of `sources`, read and validated as they are asked for (`RowView`)."""
    return Chain([RowView(s, prompt_row) for s in sources])


def load_chats(path) -> list[list[dict]]:
    """Load and validate every row of a chat source; the first bad row stops it with source:row:field."""
    return list(RowView(path, row_messages))


def load_prompts(path) -> list[PromptRow]:
    """The prompts of a data source (`align.run.formats`), each with its row's other columns."""
    return list(RowView(path, prompt_row))


# ---------------------------------------------------------------------------------------------- tokenisation
#
# The assistant-only loss mask. For each assistant turn i the chat is rendered twice: `before` = the messages before
# it with the generation prompt (exactly the prompt the model continues at inference), `upto` = the messages up to
# and including it. What `upto` adds to `before` is the turn as the template writes it; in it the template may put
# whitespace before the content (DeepSeek-V2: ' ' after 'Assistant:'), then the content itself (trimmed, as Llama-3
# renders it), then whitespace, then the end-of-turn special token (<｜end▁of▁sentence｜>, <|eot_id|>, <|im_end|>),
# then text between turns (Qwen's '\n'). The learned span runs from the end of the generation prompt through the
# end-of-turn token: the continuation the model generates, its stop token included, and nothing of the template's
# text between turns, the system / user turns or the role headers. A template the span cannot be read from that way
# is refused, naming the tokenizer: one that renders earlier turns differently once later ones follow (the prefix
# test), puts text other than whitespace between its generation prompt and the content (a role header missing from
# its generation prompt), renders the content altered, or ends the turn with no special token (nothing to stop on).
# Tokens are then labelled when they lie wholly inside a span (a token the tokenizer merged across the end of the
# generation prompt holds prompt text and is not learned).
#
# An assistant turn with tool calls is learned the same way from the end of its generation prompt: its content (if
# any), the calls as the template writes them, through the turn's last special token. Tool messages are context like
# user turns. A template that drops the calls or the tool messages is refused (`check_tools_rendered`).


FIRST_ASSISTANT = "messages[0] is an assistant turn: there is no prompt before it to learn it from"


def _special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens, longest first (an end-of-turn token must be one)."""
    names = set(tokenizer.all_special_tokens)
    names |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(names, key=len, reverse=True)


def _refuse(tokenizer, what: str) -> DataError:
    return DataError(f"the chat template of tokenizer {tokenizer.name_or_path or '?'} {what}; the assistant-only "
                     "loss mask cannot be derived from it (align/run/data.py: tokenisation)")


def _turn_span(tokenizer, before: str, upto: str, content: str, specials: list[str], i: int) -> tuple[int, int]:
    """The span of `upto` the model learns for the assistant turn rendered as `upto[len(before):]`."""
    turn = upto[len(before):]
    lead = len(turn) - len(turn.lstrip())
    content = content.strip()
    if not turn[lead:].startswith(content):
        raise _refuse(tokenizer, f"renders assistant turn messages[{i}] as {turn[:80]!r} after its generation prompt, "
                                 f"not as optional whitespace then the content {content[:40]!r}")
    rest = turn[lead + len(content):]
    gap = len(rest) - len(rest.lstrip())
    end = next((t for t in specials if rest[gap:].startswith(t)), None)
    if end is None:
        raise _refuse(tokenizer, f"ends assistant turn messages[{i}] with {rest[:40]!r}, not with a special token "
                                 f"after the content (the model could not learn to stop)")
    return len(before), len(before) + lead + len(content) + gap + len(end)


def check_tools_rendered(tokenizer, messages: list[dict]) -> None:
    """Refuse a chat template that drops tool use: each assistant message's tool calls (their names) and each tool
    message's content must be in what adding that message adds to the rendered chat (the tiny model's DeepSeek-V2
    template, for one, renders neither)."""
    for i, m in enumerate(messages):
        if m["role"] != "tool" and not m.get("tool_calls"):
            continue
        without = tokenizer.apply_chat_template(messages[:i], tokenize=False) if i else ""
        added = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        added = added[len(os.path.commonprefix([without, added])):]
        if m["role"] == "tool" and m["content"].strip() not in added:
            raise _refuse(tokenizer, f"does not render tool message messages[{i}] (adding it adds no "
                                     f"{m['content'].strip()[:40]!r} to the chat): it has no tool-message format")
        missing = [c["function"]["name"] for c in m.get("tool_calls") or [] if c["function"]["name"] not in added]
        if missing:
            raise _refuse(tokenizer, f"does not render the tool calls of assistant message messages[{i}] (no "
                                     f"{missing[0]!r} in {added[:80]!r}): it has no tool-call format")


def _call_turn_span(tokenizer, before: str, upto: str, message: dict, specials: list[str], i: int) -> tuple[int, int]:
    """The span of an assistant turn with tool calls: its content (optional) then the calls as the template writes
    them (`check_tools_rendered` made sure it does), through the turn's last special token (its end of turn)."""
    turn = upto[len(before):]
    lead = len(turn) - len(turn.lstrip())
    content = message["content"].strip()
    if content and not turn[lead:].startswith(content):
        raise _refuse(tokenizer, f"renders assistant turn messages[{i}] as {turn[:80]!r} after its generation prompt, "
                                 f"not as optional whitespace then the content {content[:40]!r}")
    ends = [(turn.rfind(t), t) for t in specials if turn.rfind(t) >= lead]
    if not ends:
        raise _refuse(tokenizer, f"ends assistant turn messages[{i}] (tool calls) with {turn[-40:]!r}, with no "
                                 f"special token (the model could not learn to stop)")
    at, end = max(ends, key=lambda e: (e[0] + len(e[1]), len(e[1])))
    return len(before), len(before) + at + len(end)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the chat template; return the text and the character spans the model learns: each
    assistant turn's content (and tool calls) and its end-of-turn token (see the comment above). Tool messages are
    context: never learned, but they must be rendered (a template that drops them is refused)."""
    check_tools_rendered(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    specials = _special_tokens(tokenizer)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(FIRST_ASSISTANT)
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)) or (spans and len(before) < spans[-1][1]):
            raise _refuse(tokenizer, f"does not render the conversation up to messages[{i}] as a prefix of its "
                                     f"continuation (it changes earlier turns when later ones are added)")
        if m.get("tool_calls"):
            spans.append(_call_turn_span(tokenizer, before, upto, m, specials, i))
        else:
            spans.append(_turn_span(tokenizer, before, upto, m["content"], specials, i))
    return text, spans


def tokenize_chat(tokenizer, messages: list[dict], max_length: int) -> dict:
    """`input_ids` and `labels` (IGNORE outside the assistant spans), truncated to `max_length` tokens. The ids are
    those of the whole rendered chat; a token is labelled when it lies wholly inside a span."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start and end <= e for s, e in spans):
            labels[t] = ids[t]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": len(ids) > max_length}


def tokenize_chats(tokenizer, chats: list[list[dict]], max_length: int, source: str = "") -> tuple[list[dict], dict]:
    """Tokenise all chats; rows left with no assistant token after truncation are dropped (and counted). A row the
    mask cannot be derived for stops it with `source:row N`."""
    out, truncated, dropped = [], 0, 0
    for i, chat in enumerate(chats):
        try:
            ex = tokenize_chat(tokenizer, chat, max_length)
        except DataError as e:
            raise DataError(f"{source}:row {i + 1}: {e}") from None
        truncated += ex.pop("truncated")
        if all(label == IGNORE for label in ex["labels"][1:]):
            dropped += 1
            continue
        out.append(ex)
    if not out:
        raise DataError(f"{source}: no row keeps an assistant token within max_length={max_length}")
    return out, {"rows": len(chats), "truncated": truncated, "dropped": dropped}


class TokenizedChats(Sequence):
    """`tokenize_chat` of `chats[i]`, made when row i is asked for: SFT without packing tokenises each batch as it
    is drawn (a 200 MB file starts training in seconds, where tokenising every row first took minutes). Each
    example keeps `truncated`; a row cut before its first assistant token stays in the order and adds no token to
    the loss (`tokenize_chats`, which packing uses, drops it instead). A row the mask cannot be derived for stops
    the run with `source:row N`."""

    def __init__(self, tokenizer, chats: Chain, max_length: int):
        self.tokenizer, self.chats, self.max_length = tokenizer, chats, max_length

    def __len__(self) -> int:
        return len(self.chats)

    def __getitem__(self, i: int) -> dict:
        chat = self.chats[i]
        try:
            return tokenize_chat(self.tokenizer, chat, self.max_length)
        except DataError as e:
            raise DataError(f"{self.chats.where(i)}: {e}") from None


# -------------------------------------------------------------------------------------------------- batching


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch (for training forward passes)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack(examples: list[dict], max_length: int, pad_id: int) -> list[dict]:
    """Greedy first-fit packing into rows of `max_length` tokens with `position_ids` restarting per example.

    A packed batch carries no attention mask: transformers then reads the position ids and keeps each example's
    attention to itself (block-diagonal causal mask).
    """
    rows: list[dict] = []
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(e["input_ids"])
        for r in rows:
            if len(r["input_ids"]) + n <= max_length:
                break
        else:
            r = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(r)
        r["input_ids"] += e["input_ids"]
        r["labels"] += e["labels"]
        r["position_ids"] += list(range(n))
    return rows


def collate_packed(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        pos[i, :n] = torch.tensor(r["position_ids"])
        pos[i, n:] = torch.arange(width - n)  # padding is its own segment, fully ignored
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def batch_indices(n_rows: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Rows of global batch `step`: epochs are concatenated seeded permutations, so the order depends on step only."""
    start, out = step * global_batch, []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out += perm[offset: offset + global_batch - len(out)]
    return out


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end a completion: EOS, and the template's end-of-turn token where it differs (Llama-3's
    <|eot_id|>, Qwen's <|im_end|>): what SFT taught the model to emit when its turn is done."""
    ids = [tokenizer.eos_token_id]
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    try:
        text, spans = assistant_char_spans(tokenizer, chat)
    except DataError:
        return ids  # a template the mask refuses: SFT refuses it too, EOS alone stops
    end = next((t for t in _special_tokens(tokenizer) if text[:spans[0][1]].endswith(t)), None)
    if end is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end))
    return list(dict.fromkeys(i for i in ids if i is not None))
