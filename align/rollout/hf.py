"""Rollouts with transformers `generate` on the policy itself (no copy; weight sync is a no-op).

Prompts are rendered with the tokenizer's chat template plus the generation prompt, left-padded, each repeated G
times. Sampling log-probs come from the raw logits `generate` returns (`output_logits`), divided by the temperature:
the processed `scores` are post-top-p and differ by ~2e-3 (../shared/DESIGN.md §2).
"""

from __future__ import annotations

import torch

from .protocol import Rollouts, SamplingConfig


def completion_mask_from_stops(ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, C] of tokens up to and including the first stop token, and whether each row never stopped."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))                 # [N, C]
    seen = is_stop.long().cumsum(dim=1)                                                  # [N, C]
    mask = (seen == 0) | (is_stop & (seen == 1))                                         # up to first stop
    return mask.long(), ~is_stop.any(dim=1)


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
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                do_sample=not greedy, temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p, top_k=None,
                eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
                stop_strings=sampling.stop or None, tokenizer=tok if sampling.stop else None,
                output_logits=True, return_dict_in_generate=True, synced_gpus=self.synced)
            new = gen.sequences[:, ids.shape[1]:]                                        # [b, c]
            logits = torch.stack(gen.logits, dim=1).float()                              # [b, c, V]
            if not greedy:
                logits = logits / sampling.temperature
            logps.append(torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1).cpu())
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
