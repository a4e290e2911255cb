"""Rollouts with transformers `generate` on the policy itself (no copy; weight sync is a no-op).

Prompts are rendered with the tokenizer's chat template plus the generation prompt, left-padded, each repeated G
times. Sampling log-probs are those of the distribution each token was drawn from (after the repetition penalty,
temperature, top-k, top-p and min-p, what was kept renormalised), as vLLM reports them (`processed_logprobs`).

The draw itself happens in a logits processor (`Sampler`), after align's processors (`processors`): it takes
the log-softmax it needs for the log-prob anyway, draws the token by inverse CDF (one uniform per row and a
cumulative sum; `torch.multinomial` draws an exponential for every vocabulary entry, 25x slower on CPU here),
records log p(token) and hands `generate` scores whose argmax is that token, so `generate` runs greedy. Taking
log-probs this way holds one step's [b, V] at a time; asking `generate` for all logits (`output_logits`) would
hold steps x rows x vocab of them, 27 GB in bf16 for 256 rows x 512 tokens x 102,400.

The KV cache (`align.model.kvcache.ReservedCache`) writes each step into room reserved up front instead of concatenating:
a growing cache copies itself every step, O(T²) over a completion (a fifth of `generate`'s time on the tiny model).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..model import fastpaths
from ..model.compat import CACHE_KW
from ..model.kvcache import ReservedCache, ReservedLayer, prefilled_cache  # noqa: F401 (ReservedLayer re-exported)
from ..model.mla import absorbed_mla, attention_modules
from ..model.moe import decode_experts_kernel
from ..model.policy import causal_lm
from ..model.routing import NO_ROUTE, recording
from ..run.data import stop_token_ids
from .protocol import Rollouts, SamplingConfig


def completion_mask_from_stops(ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, C] of tokens up to and including the first stop token, and whether each row never stopped."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))                 # [N, C]
    seen = is_stop.long().cumsum(dim=1)                                                  # [N, C]
    mask = (seen == 0) | (is_stop & (seen == 1))                                         # up to first stop
    return mask.long(), ~is_stop.any(dim=1)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row drawn from `probs` [b, V] (unnormalised, non-negative) by inverse CDF: [b, 1].

    P(i) = p_i / Σp. A zero-probability token is never drawn: u < Σp strictly, and the first index whose cumulative
    sum exceeds u has p > 0."""
    cdf = probs.float().cumsum(-1)                                                      # [b, V]
    total = cdf[:, -1:]                                                                 # [b, 1]
    u = torch.rand(total.shape, device=probs.device, generator=generator) * total       # [b, 1] in [0, Σp)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))              # rounding never reaches Σp
    return torch.searchsorted(cdf, u, right=True)                                       # [b, 1]


class Sampler:
    """A logits processor, last in the list (after the temperature / top-p warpers), that draws the next token from
    softmax(scores), records its log-prob, and returns scores whose argmax is that token (generate runs greedy).
    With `greedy` it keeps generate's argmax and records that token's log-prob."""

    def __init__(self, greedy: bool = False):
        self.greedy = greedy
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float(), dim=-1)                                # [b, V]
        token = scores.argmax(-1, keepdim=True) if self.greedy else sample_from(logp.exp())  # [b, 1] as generate picks
        self.steps.append(logp.gather(-1, token).squeeze(-1))                           # [b]
        if self.greedy:
            return scores
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)          # [b, V] one-hot

    def result(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[b, c] log-probs of the c generated tokens."""
        c = new_tokens.shape[1]
        return torch.stack(self.steps, dim=1)[:, :c] if self.steps else new_tokens.float()[:, :0]


class RepetitionPenalty:
    """vLLM's / CTRL's repetition penalty over the prompt's real tokens and the completion so far: a seen token's
    logit is divided by `penalty` when positive, multiplied when negative. transformers' own processor would also
    count the left padding (the pad token, often EOS: a padded row would be kept from stopping)."""

    def __init__(self, penalty: float, prompt_mask: torch.Tensor):
        self.penalty = penalty
        self.prompt_mask = prompt_mask.bool()                                           # [b, P]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        real = torch.ones_like(input_ids, dtype=torch.long)                             # [b, P + t]
        real[:, :self.prompt_mask.shape[1]] = self.prompt_mask.long()
        seen = torch.zeros_like(scores, dtype=torch.long).scatter_add_(1, input_ids, real) > 0  # [b, V]
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(seen, penalised, scores)


def processors(sampling: SamplingConfig, prompt_mask: torch.Tensor) -> list:
    """The logits processors ahead of the `Sampler`, in vLLM's order: repetition penalty on the raw logits (greedy
    too; `prompt_mask` [b, P] tells the prompt's real tokens from its padding), then temperature, top-k, top-p,
    min-p (sampling only)."""
    out = []
    if sampling.repetition_penalty != 1.0:
        out.append(RepetitionPenalty(sampling.repetition_penalty, prompt_mask))
    if sampling.temperature == 0:
        return out
    out.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        out.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        out.append(TopPLogitsWarper(sampling.top_p))
    if sampling.min_p > 0:
        out.append(MinPLogitsWarper(sampling.min_p))
    return out


def stop_string_end(tokenizer, ids: list[int], stops: list[str]) -> int | None:
    """Number of tokens up to and including the one that completes the first stop string, or None."""
    text = ""
    for k, t in enumerate(ids):
        text += tokenizer.decode([t], skip_special_tokens=True)
        if any(s in text for s in stops):
            return k + 1
    return None


def prompt_texts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    """Chat prompts rendered with the tokenizer's template plus the generation prompt (every engine uses this)."""
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


def _sampled_routes(prefill, calls, n: int, width: int) -> torch.Tensor:
    """Routes [b, width, L, k] of one generate batch from the recorder's calls: the shared prefill (over each
    prompt once, repeated for its n samples), then generate's own calls along time; NO_ROUTE where none."""
    layers = []
    for layer, steps in enumerate(calls):
        parts = [c.repeat_interleave(n, 0) for c in (prefill[layer] if prefill else [])] + steps
        layers.append(torch.cat(parts, 1)[:, :width])                                   # [b, <=width, k]
    out = torch.stack(layers, 2)                                                        # [b, t, L, k]
    return torch.nn.functional.pad(out, (0, 0, 0, 0, 0, width - out.shape[1]), value=NO_ROUTE).cpu()


class HFEngine:
    runs_ahead = False     # generation cannot overlap training (it shares the trainer's process)
    own_weights = False    # samples with the policy itself
    cheap_routes = True    # the routes come from its own forwards, at no cost
    sized_by_prompts = False  # max_model_len unused: transformers generate allocates per batch

    @classmethod
    def check(cls, rollout, model_dtype: str, replay_routes: bool) -> None:
        """Runs wherever the policy does."""

    @classmethod
    def start(cls, rollout, ctx) -> HFEngine:
        # sharded weights (FSDP2 / ZeRO-3): every process takes part in each decode step
        return cls(ctx.model, ctx.tokenizer, synced=ctx.processes > 1, record_routes=ctx.record_routes)

    def __init__(self, model, tokenizer, synced: bool = False, record_routes: bool = False):
        """`synced`: several processes hold shards of the weights (FSDP2 / ZeRO-3): each keeps stepping until all
        are done, so every decode step's all-gathers happen on every process. `record_routes`: return the MoE
        routes each token took while sampling (`Rollouts.routes`)."""
        self.model = model
        self.tokenizer = tokenizer
        self.synced = synced
        self.record_routes = record_routes
        self.last_sync_s = 0.0
        self.sync_metrics: dict[str, float] = {}

    def sync_weights(self, model) -> None:
        pass  # generation runs on the training model itself

    def close(self) -> None:
        pass

    def encode_prompts(self, prompts: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(prompt_texts(self.tokenizer, prompts), padding=True, add_special_tokens=False,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def generate(self, prompts: list[list[dict]], n: int, sampling: SamplingConfig) -> Rollouts:
        prompt_ids, prompt_mask = self.encode_prompts(prompts)                           # [B, P]
        return self._generate(prompt_ids, prompt_mask, n, sampling)

    def generate_ids(self, ids: list[list[int]], n: int, sampling: SamplingConfig) -> Rollouts:
        """G = n completions for each prompt given as token ids (multi-turn rollouts continue a sequence)."""
        P = max(len(i) for i in ids)
        prompt_ids = torch.full((len(ids), P), self.tokenizer.pad_token_id, dtype=torch.long)   # [B, P] left-padded
        prompt_mask = torch.zeros(len(ids), P, dtype=torch.long)                                # [B, P]
        for b, row in enumerate(ids):
            prompt_ids[b, P - len(row):] = torch.tensor(row, dtype=torch.long)
            prompt_mask[b, P - len(row):] = 1
        return self._generate(prompt_ids, prompt_mask, n, sampling)

    @torch.no_grad()
    def _generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int,
                  sampling: SamplingConfig) -> Rollouts:
        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        prompt_ids = prompt_ids.repeat_interleave(n, dim=0)                              # [N, P]
        prompt_mask = prompt_mask.repeat_interleave(n, dim=0)                            # [N, P]
        stop_ids = stop_token_ids(tok)
        was_training = model.training
        model.eval()
        outs, logps, routes = [], [], []
        for s in range(0, prompt_ids.shape[0], sampling.batch_size):
            ids = prompt_ids[s:s + sampling.batch_size].to(device)
            mask = prompt_mask[s:s + sampling.batch_size].to(device)
            greedy = sampling.temperature == 0
            sampler = Sampler(greedy)
            warpers = processors(sampling, mask)
            # our warpers, then the sampler; generate runs greedy on the sampler's choice. temperature, top_p and
            # top_k are passed as None so generate adds no processors of its own (nor its default top-k of 50)
            room = sampling.max_new_tokens + 1
            # decode steps read MLA's latent cache directly (see mla.py); inference mode: no autograd bookkeeping
            record = recording(model) if self.record_routes else contextlib.nullcontext()
            absorbed = bool(attention_modules(model)) and fastpaths.active("absorbed_mla")
            with absorbed_mla(model, absorbed), decode_experts_kernel(causal_lm(model), len(ids)), torch.inference_mode(), \
                    record as recorder:
                cache = None
                if fastpaths.active("prefill_cache"):  # else generate's own cache, no shared prefill
                    cache = prefilled_cache(model, ids, mask, n, room) if s % n == 0 else None
                    cache = ReservedCache(room) if cache is None else cache
                prefill = recorder.take() if recorder is not None else None
                gen = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                    do_sample=False, temperature=None, top_p=None, top_k=None,
                    eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
                    stop_strings=sampling.stop or None, tokenizer=tok if sampling.stop else None,
                    logits_processor=LogitsProcessorList([*warpers, sampler]), synced_gpus=self.synced,
                    **({CACHE_KW: cache} if cache is not None else {}))
            new = gen[:, ids.shape[1]:]                                                  # [b, c]
            if recorder is not None:
                routes.append(_sampled_routes(prefill, recorder.take(), n, ids.shape[1] + new.shape[1]))
            logps.append(sampler.result(new).cpu())                                     # [b, c]
            outs.append(new.cpu())
        if was_training:
            model.train()
        width = max(o.shape[1] for o in outs)
        completion_ids = torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=tok.pad_token_id)
                                    for o in outs])                                      # [N, C]
        sampling_logprobs = torch.cat([torch.nn.functional.pad(lp, (0, width - lp.shape[1])) for lp in logps])
        completion_mask, truncated = completion_mask_from_stops(completion_ids, stop_ids)
        if sampling.stop:  # a row that ends on a stop string: tokens after it are padding, and it is not truncated
            for i in range(completion_ids.shape[0]):
                end = stop_string_end(tok, completion_ids[i][completion_mask[i].bool()].tolist(), sampling.stop)
                if end is not None:
                    completion_mask[i, end:] = 0
                    truncated[i] = False
        sampling_logprobs = sampling_logprobs * completion_mask
        texts = [tok.decode(ids[m.bool()], skip_special_tokens=True)
                 for ids, m in zip(completion_ids, completion_mask)]
        if routes:  # [N, P+C, L, k], the last token of each row never routed
            routes = torch.cat([torch.nn.functional.pad(r, (0, 0, 0, 0, 0, prompt_ids.shape[1] + width - r.shape[1]),
                                                        value=NO_ROUTE) for r in routes])
        return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, sampling_logprobs, truncated,
                        texts, n, routes if self.record_routes else None)
