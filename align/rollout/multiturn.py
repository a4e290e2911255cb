"""Multi-turn rollouts with tools, over any engine, by token ids (`tools.protocol`: fence | chat).

Each of the B·G samples is its own sequence: prompt, turn 1, tool answer 1, turn 2, ... The engine continues every
unfinished sample from its exact token ids (`engine.generate_ids`), never from re-rendered or re-tokenised text, so
what the trainer scores is what was sampled (BPE is not a bijection: decoding and re-encoding a turn can change its
ids). Per turn:

    generate   every unfinished sample, to its stop: a tool call's end (fence: a block's closing fence; chat: the
               end-of-turn token) or EOS or the token budget (sampling.max_new_tokens, over all turns and answers)
    parse      fence: the block ```name ... ``` the turn ends with (python: its code; any other tool: a JSON object
               of arguments); chat: every <tool_call>{"name": ..., "arguments": {...}}</tool_call> of the turn. No
               call: the sample is done; a call in turn `max_turns`: done, not run (tools/max_turns_hit)
    call       the tools (align/rollout/tools.py), `workers` at a time; an error is the answer (tools/failures)
    append     the answer's ids: fence ```output ... ```; chat the template's own tool message and generation
               prompt; cut to `max_output_tokens` with a marker; loss mask 0, attention 1

Masks of the packed `Rollouts`: completion_mask 1 on every token (turns and answers: the model attends to both),
loss_mask 1 on the sampled tokens only (each turn's stop token included), sampling log-probs 0 on answers.
`truncated` is True where the budget ran out. MoE routes are not recorded (routing_replay=rollout is refused).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import re
from typing import Any

import torch

from ..config import ConfigError
from ..run.data import stop_token_ids
from .hf import prompt_texts
from .protocol import Rollouts, SamplingConfig, pack_rollouts
from .tools import Toolbox, ToolsConfig, call_tool


@dataclasses.dataclass
class Sample:
    prompt: list[int]
    env: Any = None                   # the sample's environment instance (tools.environment)
    ids: list[int] = dataclasses.field(default_factory=list)       # completion: turns and answers
    loss: list[int] = dataclasses.field(default_factory=list)      # 1 sampled, 0 answer
    logps: list[float] = dataclasses.field(default_factory=list)   # sampling log-probs (0 on answers)
    cells: list[str] = dataclasses.field(default_factory=list)     # python code run so far (python_state)
    turns: int = 0
    calls: int = 0
    failures: int = 0
    done: bool = False
    truncated: bool = False


Call = tuple[str, Any]  # (tool name, arguments); arguments is an error string where the call did not parse


class Fence:
    """A fenced block named after the tool; answered by an ```output``` block. Needs nothing of the template."""

    name = "fence"
    stop = ["\n```\n"]  # a block's closing fence (an opening one is followed by a name)

    def check(self, tokenizer, box: Toolbox, model_path: str) -> None:
        pass

    def prompt_ids(self, tokenizer, messages: list[dict], box: Toolbox) -> list[int]:
        return tokenizer(prompt_texts(tokenizer, [messages])[0], add_special_tokens=False)["input_ids"]

    def calls(self, text: str, ended_by_stop_token: bool) -> list[Call]:
        if ended_by_stop_token or not text.rstrip().endswith("```"):
            return []
        close = text.rstrip().rfind("```")
        start = text.rfind("```", 0, close)
        if start < 0:
            return [("", "a tool call is a block that opens with ```python or ```<tool name> on its own line")]
        header, _, body = text[start + 3:close].partition("\n")
        name, body = header.strip(), body.rstrip("\n")
        if name == "python":
            return [(name, {"code": body})]
        try:
            args = json.loads(body) if body.strip() else {}
        except json.JSONDecodeError as e:
            return [(name, f"the block's body must be a JSON object of arguments ({e})")]
        return [(name, args)]

    def answer_ids(self, tokenizer, answers: list[tuple[str, str]], last_token: int) -> list[int]:
        text = "".join(f"```output\n{a.rstrip(chr(10))}\n```\n" for _, a in answers)
        return _plain_ids(tokenizer, text)


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class Chat:
    """The chat template's tool-call format: tools listed by the template (`tools=`), calls as
    <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Qwen / Hermes), answers as the template's tool
    messages. Templates without that format are refused."""

    name = "chat"
    stop: list[str] = []  # a turn ends with the template's end-of-turn token

    def check(self, tokenizer, box: Toolbox, model_path: str) -> None:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "probe", "arguments": {"a": 1}}}]}]
        try:
            text = tokenizer.apply_chat_template(probe, tools=box.schemas(), tokenize=False)
            self._answer_text(tokenizer, [("probe", "1")], None)
        except Exception as e:  # noqa: BLE001 (a template without tool support raises in many ways)
            raise ConfigError(f"key 'tools.protocol': chat needs a chat template with tool calls; the one of "
                              f"{model_path} fails on them ({type(e).__name__}: {e}); use tools.protocol=fence") from None
        if "<tool_call>" not in text:
            raise ConfigError(f"key 'tools.protocol': the chat template of {model_path} has no <tool_call> format "
                              "(align reads Qwen / Hermes-style calls); use tools.protocol=fence")

    def prompt_ids(self, tokenizer, messages: list[dict], box: Toolbox) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tools=box.schemas(), tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def calls(self, text: str, ended_by_stop_token: bool) -> list[Call]:
        out: list[Call] = []
        for body in _TOOL_CALL.findall(text):
            try:
                call = json.loads(body)
                out.append((str(call["name"]), call.get("arguments", {})))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                out.append(("", f"a tool call must be JSON {{\"name\": ..., \"arguments\": {{...}}}} ({e})"))
        return out

    def _answer_text(self, tokenizer, answers: list[tuple[str, str]], last: str | None) -> str:
        calls = [{"type": "function", "function": {"name": n or "tool", "arguments": {}}} for n, _ in answers]
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": calls}]
        before = tokenizer.apply_chat_template(base, tokenize=False)
        after = tokenizer.apply_chat_template(base + [{"role": "tool", "name": n or "tool", "content": a}
                                                      for n, a in answers], tokenize=False, add_generation_prompt=True)
        if not after.startswith(before):
            raise ValueError("the template renders an assistant turn differently once a tool message follows")
        # the sampled turn ended with its end-of-turn token; what the template writes after that token comes first
        gap = before[before.rfind(last) + len(last):] if last and last in before else ""
        return gap + after[len(before):]

    def answer_ids(self, tokenizer, answers: list[tuple[str, str]], last_token: int) -> list[int]:
        """The template's own tokens as special tokens; the answers' text never (see _plain_ids)."""
        marks = [f"\x00answer{i}\x00" for i in range(len(answers))]
        text = self._answer_text(tokenizer, [(n, m) for (n, _), m in zip(answers, marks)],
                                 tokenizer.decode([last_token]))
        ids: list[int] = []
        for mark, (_, answer) in zip(marks, answers):
            before, _, text = text.partition(mark)
            ids += tokenizer(before, add_special_tokens=False)["input_ids"] + _plain_ids(tokenizer, answer)
        return ids + tokenizer(text, add_special_tokens=False)["input_ids"]


PROTOCOLS = {"fence": Fence, "chat": Chat}


def _plain_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a tool's answer with special-token strings as plain text: a program that prints
    "<｜end▁of▁sentence｜>User: ..." must not end the turn or forge a user message in the model's context."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def capped(tokenizer, text: str, limit: int) -> str:
    """`text` cut to about `limit` tokens, with a marker saying how much was cut."""
    ids = tokenizer(text[:limit * 16], add_special_tokens=False)["input_ids"]
    if len(ids) <= limit and len(text) <= limit * 16:
        return text
    keep = tokenizer.decode(ids[:max(limit - 8, 1)])
    return f"{keep}\n[... output cut: {len(text) - len(keep)} more characters]"


class ToolRollouts:
    """Samples G multi-turn completions per prompt row through `engine` (one per run: the toolbox and protocol are
    checked once)."""

    def __init__(self, engine, tokenizer, cfg: ToolsConfig, box: Toolbox, model_path: str):
        self.engine, self.tokenizer, self.cfg, self.box = engine, tokenizer, cfg, box
        if getattr(engine, "synced", False):  # FSDP / ZeRO-3 generate in lock-step; samples' turns differ per process
            raise ConfigError("key 'tools.protocol': multi-turn rollouts with rollout.engine=hf over several processes "
                              "(sharded weights generate in lock-step, and each process's samples take their own "
                              "number of turns); use rollout.engine=vllm or vllm_server")
        self.protocol = PROTOCOLS[cfg.protocol]()
        self.protocol.check(tokenizer, box, model_path)
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.workers, thread_name_prefix="align-tool")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __call__(self, rows: list, n: int, sampling: SamplingConfig) -> Rollouts:
        """rows: prompt rows (`.messages`, `.columns`); G = n samples each, grouped per prompt."""
        tok, cfg, budget = self.tokenizer, self.cfg, sampling.max_new_tokens
        prompts = [self.protocol.prompt_ids(tok, r.messages, self.box) for r in rows]
        samples = [Sample(p, self.box.new_environment(r.columns)) for r, p in zip(rows, prompts) for _ in range(n)]
        turn_sampling = dataclasses.replace(sampling, stop=[*sampling.stop, *self.protocol.stop])
        with getattr(self.engine, "awake", contextlib.nullcontext)():  # colocated vLLM: no sleep between turns
            max_turns_hit = self._turns(samples, prompts, n, turn_sampling, budget)
        return self._pack(samples, n, max_turns_hit)

    def _turns(self, samples: list[Sample], prompts: list[list[int]], n: int, turn_sampling: SamplingConfig,
               budget: int) -> int:
        """Generate, parse, call and append until every sample is done; returns how many hit max_turns."""
        tok, cfg = self.tokenizer, self.cfg
        max_turns_hit = 0
        for turn in range(cfg.max_turns):
            active = [s for s in samples if not s.done]
            if not active:
                break
            step = dataclasses.replace(turn_sampling, max_new_tokens=max(budget - len(s.ids) for s in active))
            out = (self.engine.generate_ids(prompts, n, step) if turn == 0 else
                   self.engine.generate_ids([s.prompt + s.ids for s in active], 1, step))
            pending = []
            for i, s in enumerate(active):
                m = out.completion_mask[i].bool()
                ids, logps = out.completion_ids[i][m].tolist(), out.sampling_logprobs[i][m].tolist()
                room = budget - len(s.ids)
                cut = len(ids) > room
                ids, logps = ids[:room], logps[:room]
                s.ids += ids
                s.loss += [1] * len(ids)
                s.logps += logps
                s.turns += 1
                if bool(out.truncated[i]) or cut:
                    s.done = s.truncated = True
                    continue
                text = tok.decode(ids, skip_special_tokens=False)
                found = self.protocol.calls(text, bool(ids) and ids[-1] in self.stop_ids)
                if not found:
                    s.done = True
                elif turn == cfg.max_turns - 1:
                    s.done, max_turns_hit = True, max_turns_hit + 1
                elif len(s.ids) >= budget:
                    s.done = s.truncated = True
                else:
                    pending.append((s, found, ids[-1]))
            for (s, found, last), answers in zip(pending, self.pool.map(self._run, pending)):
                s.calls += len(found)
                s.failures += sum(failed for _, _, failed in answers)
                s.cells += [args["code"] for name, args in found if name == "python" and isinstance(args, dict)]
                ids = self.protocol.answer_ids(tok, [(name, capped(tok, a, cfg.max_output_tokens))
                                                     for name, a, _ in answers], last)
                room = budget - len(s.ids)
                if len(ids) >= room:
                    ids, s.done, s.truncated = ids[:room], True, True
                s.ids += ids
                s.loss += [0] * len(ids)
                s.logps += [0.0] * len(ids)
        return max_turns_hit

    def _run(self, item) -> list[tuple[str, str, bool]]:
        s, found, _ = item
        out = []
        for name, args in found:
            if isinstance(args, str):  # did not parse
                out.append((name, f"error: {args}", True))
                continue
            answer, failed = call_tool(self.box, name, args, s.env, tuple(s.cells))
            out.append((name, answer, failed))
        return out

    def _pack(self, samples: list[Sample], n: int, max_turns_hit: int) -> Rollouts:
        """The protocol's layout (pack_rollouts: completion_mask 1 on turns and answers), plus the loss mask, the
        tool statistics and the environments."""
        out = pack_rollouts([(s.prompt, s.ids, s.logps, s.truncated) for s in samples], n, self.tokenizer)
        loss_mask = torch.zeros_like(out.completion_mask)                               # [N, C] sampled tokens
        for i, s in enumerate(samples):
            loss_mask[i, :len(s.loss)] = torch.tensor(s.loss, dtype=torch.long)
        N = len(samples)
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        stats = {"tools/calls": mean([s.calls for s in samples]), "tools/turns": mean([s.turns for s in samples]),
                 "tools/failures": mean([s.failures for s in samples]),
                 "tools/used_frac": mean([s.calls > 0 for s in samples]),
                 "tools/answer_tokens": mean([len(s.loss) - sum(s.loss) for s in samples]),
                 "tools/max_turns_hit": max_turns_hit / N}
        out.loss_mask, out.tool_stats = loss_mask, stats
        out.columns = {"environment": [s.env for s in samples]} if self.box.environment is not None else None
        return out
