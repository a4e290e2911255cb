"""Rollouts with transformers `generate` on the policy itself (no copy; weight sync is a no-op).

Prompts are rendered with the tokenizer's chat template plus the generation prompt, left-padded, each repeated G
times. Sampling log-probs are those of the distribution each token was drawn from (logits / temperature, and with
top_p < 1 the nucleus renormalised), as vLLM reports them. They are taken one step at a time by a logits processor
(`SampledLogprobs`): asking `generate` for all logits (`output_logits`) would hold steps x rows x vocab of them, 27 GB
in bf16 for 256 rows x 512 tokens x 102,400.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from .mla import absorbed_mla
from .protocol import Rollouts, SamplingConfig


def completion_mask_from_stops(ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, C] of tokens up to and including the first stop token, and whether each row never stopped."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))                 # [N, C]
    seen = is_stop.long().cumsum(dim=1)                                                  # [N, C]
    mask = (seen == 0) | (is_stop & (seen == 1))                                         # up to first stop
    return mask.long(), ~is_stop.any(dim=1)


class SampledLogprobs:
    """A logits processor (after the temperature / top-p warpers, so it sees the scores sampling uses) that records
    log softmax(scores)[sampled token] one step behind: at step t+1 the token drawn at step t is in input_ids.
    Holds one step's scores [b, V] at a time."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def _record(self, tokens: torch.Tensor) -> None:
        logp = self.previous - torch.logsumexp(self.previous, dim=-1, keepdim=True)          # [b, V]
        self.steps.append(logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))                # [b]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self._record(input_ids[:, -1])
        self.previous = scores.float()
        return scores

    def result(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[b, c] log-probs of the c generated tokens."""
        if self.previous is not None and len(self.steps) < new_tokens.shape[1]:
            self._record(new_tokens[:, len(self.steps)])
        self.previous = None
        return torch.stack(self.steps, dim=1)[:, :new_tokens.shape[1]] if self.steps else new_tokens.float()[:, :0]


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


class HFEngine:
    def __init__(self, model, tokenizer, synced: bool = False):
        """`synced`: several processes hold shards of the weights (FSDP2 / ZeRO-3): each keeps stepping until all
        are done, so every decode step's all-gathers happen on every process."""
        self.model = model
        self.tokenizer = tokenizer
        self.synced = synced
        self.last_sync_s = 0.0

    def sync_weights(self, model) -> None:
        pass  # generation runs on the training model itself

    def encode_prompts(self, prompts: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(prompt_texts(self.tokenizer, prompts), padding=True, add_special_tokens=False,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def _shared_prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int):
        """The KV cache of each distinct prompt but its last token, computed once and repeated for its n samples
        (generate then starts from the last prompt token); None where that does not apply."""
        p_ids, p_mask = ids[::n, :-1], mask[::n, :-1]                                   # [b, P-1]
        if n < 2 or ids.shape[0] % n or ids.shape[1] < 2 or (p_mask.sum(1) == 0).any():
            return None
        positions = (p_mask.long().cumsum(-1) - 1).masked_fill(p_mask == 0, 1)          # as generate numbers them
        cache = self.model(input_ids=p_ids, attention_mask=p_mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(n)                                                 # [b*n, ...] per layer
        return cache

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], n: int, sampling: SamplingConfig) -> Rollouts:
        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = self.encode_prompts(prompts)                           # [B, P]
        prompt_ids = prompt_ids.repeat_interleave(n, dim=0)                              # [N, P]
        prompt_mask = prompt_mask.repeat_interleave(n, dim=0)                            # [N, P]
        stop_ids = [tok.eos_token_id]
        was_training = model.training
        model.eval()
        outs, logps = [], []
        for s in range(0, prompt_ids.shape[0], sampling.batch_size):
            ids = prompt_ids[s:s + sampling.batch_size].to(device)
            mask = prompt_mask[s:s + sampling.batch_size].to(device)
            greedy = sampling.temperature == 0
            recorder = SampledLogprobs()
            warpers = [] if greedy else [TemperatureLogitsWarper(sampling.temperature)]
            if not greedy and sampling.top_p < 1:
                warpers.append(TopPLogitsWarper(sampling.top_p))
            # our warpers, then the recorder: generate puts a caller's processors before its own, so temperature,
            # top_p and top_k are passed as None (top_k=None also drops transformers' default top-k of 50)
            with absorbed_mla(model):  # decode steps read MLA's latent cache directly (see mla.py)
                cache = self._shared_prefill(ids, mask, n) if s % n == 0 else None
                gen = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                    do_sample=not greedy, temperature=None, top_p=None, top_k=None,
                    eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
                    stop_strings=sampling.stop or None, tokenizer=tok if sampling.stop else None,
                    logits_processor=LogitsProcessorList([*warpers, recorder]), synced_gpus=self.synced,
                    past_key_values=cache)
            new = gen[:, ids.shape[1]:]                                                  # [b, c]
            logps.append(recorder.result(new).cpu())                                     # [b, c]
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
        return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, sampling_logprobs, truncated,
                        texts, n)
