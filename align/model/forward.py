"""The computation behind `align.model.logprobs` (read its docstring): the chunked LM-head projection, the forward with
the head swapped for a capture of the hidden states, and the shared-prompt forward. Below `align.model.fastpaths`, which
probes the shared-prompt path with these functions: whether a group's prompt runs once is an argument here, decided
by `logprobs.forward_logprobs`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target], unchunked, in fp32 (the reference the chunked version is tested against)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
           with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight).float()                          # [n, V]
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)                              # [n]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # [n]
    if with_entropy:
        with torch.no_grad():
            detached = logits.detach()
            entropy = lse.detach() - (torch.softmax(detached, dim=-1) * detached).sum(-1)  # [n]
    else:
        entropy = torch.zeros_like(logp)
    return logp, entropy


CHECKPOINT_ABOVE = 1 << 24  # logits elements per chunk (64 MB in fp32) above which backward recomputes them


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk_tokens: int = 1024, temperature: float = 1.0,
                           with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each target token (and optionally the entropy of its distribution).

    hidden: [..., H] final hidden states; weight: [V, H] LM head; targets: [...] token ids.
    Returns logprobs [...] (fp32) and entropy [...] or None. Entropy is computed without gradient. Under autograd a
    chunk whose logits exceed CHECKPOINT_ABOVE elements is checkpointed; smaller ones (tiny vocabularies) are not
    worth the recompute.
    """
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])                           # [N, H]
    t = targets.reshape(-1)                                            # [N]
    logps, ents = [], []
    for start in range(0, t.numel(), chunk_tokens):
        hc, tc = h[start:start + chunk_tokens], t[start:start + chunk_tokens]
        needs_grad = torch.is_grad_enabled() and (hc.requires_grad or weight.requires_grad)
        if needs_grad and tc.numel() * weight.shape[0] > CHECKPOINT_ABOVE:
            logp, ent = checkpoint(_chunk, hc, weight, tc, temperature, with_entropy, use_reentrant=False)
        else:
            logp, ent = _chunk(hc, weight, tc, temperature, with_entropy)
        ents.append(ent)
        logps.append(logp)
    logp = torch.cat(logps).reshape(shape)
    entropy = torch.cat(ents).reshape(shape) if with_entropy else None
    return logp, entropy


class _CaptureHidden(torch.nn.Module):
    """Stands in for the LM head during a forward: keeps the hidden states, returns an empty tensor."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden[..., :0]


@contextlib.contextmanager
def _lm_head_captured(lm):
    head = lm.lm_head
    capture = _CaptureHidden()
    lm.lm_head = capture
    try:
        yield head, capture
    finally:
        lm.lm_head = head


@dataclass
class ForwardOut:
    logprobs: torch.Tensor                     # [B, n] log-prob of each of the last n tokens
    entropy: torch.Tensor | None               # [B, n]
    router_logits: tuple[torch.Tensor, ...]    # per MoE layer [tokens, E] (empty for dense models)
    router_mask: torch.Tensor | None = None    # [tokens] 1 on real tokens of router_logits' rows (None: the rows
                                               # are input_ids' [B*T] and the attention mask tells)
    routes: torch.Tensor | None = None         # [B, T, L, k] the MoE routes used (with record_routes)


def forward_shared_prompt(model, lm, input_ids, attention_mask, n_targets: int, group_size: int, kwargs):
    """Final hidden states [N, n, H] for the last n tokens, each group's prompt run once; and router logits."""
    from .compat import CACHE_KW, output_cache
    from .mla import shared_prefix_kv

    P = input_ids.shape[1] - n_targets
    with _lm_head_captured(lm) as (head, capture), shared_prefix_kv(lm, group_size) as completion_cache:
        out = model(input_ids=input_ids[::group_size, :P], attention_mask=attention_mask[::group_size, :P],
                    use_cache=completion_cache is None, logits_to_keep=1, **kwargs)
        last = capture.hidden                                          # [B, 1, H] last prompt position
        if completion_cache is not None:  # MLA: the prompt's keys / values are held by shared_prefix_kv
            cache = completion_cache(P)
        else:
            cache = output_cache(out)
            cache.batch_repeat_interleave(group_size)                 # [B*G, ...] per layer, differentiable
        out_c = model(input_ids=input_ids[:, P:], attention_mask=attention_mask, use_cache=True,
                      logits_to_keep=n_targets, **{CACHE_KW: cache}, **kwargs)
        hidden = torch.cat([last.repeat_interleave(group_size, 0), capture.hidden[:, :-1]], 1)  # [N, n, H]
    routers = tuple(torch.cat([a, b]) for a, b in zip(getattr(out, "router_logits", None) or (),
                                                      getattr(out_c, "router_logits", None) or ()))
    router_mask = torch.cat([attention_mask[::group_size, :P].reshape(-1), attention_mask[:, P:].reshape(-1)])
    return head, hidden, routers, router_mask


def _route_plan(routes: torch.Tensor, shared: bool, group_size: int, P: int) -> list[list[torch.Tensor]]:
    """routes [n, T, L, k] as each MoE layer's gate calls see them in this forward (see align/model/routing.py)."""
    if not shared:
        return [[routes[:, :, layer]] for layer in range(routes.shape[2])]
    return [[routes[::group_size, :P, layer], routes[:, P:, layer]] for layer in range(routes.shape[2])]


def _recorded_routes(calls: list[list[torch.Tensor]], shared: bool, group_size: int) -> torch.Tensor:
    """The recorder's per-layer calls laid out as routes [n, T, L, k]."""
    if shared:
        rows = [torch.cat([c[0].repeat_interleave(group_size, 0), c[1]], 1) for c in calls]   # [n, T, k] each
    else:
        rows = [c[0] for c in calls]
    return torch.stack(rows, 2)                                        # [n, T, L, k]


def forward_rows(model, input_ids: torch.Tensor, n_targets: int, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, chunk_tokens: int = 1024, temperature: float = 1.0,
                 with_entropy: bool = False, router_logits: bool = False, group_size: int = 1,
                 routes: torch.Tensor | None = None, record_routes: bool = False,
                 shared: bool = False) -> ForwardOut:
    """`logprobs.forward_logprobs` with its one decision taken by the caller: `shared`, run each group of
    `group_size` rows' prompt once (`forward_shared_prompt`; the caller has checked that the rows share it and, for
    MLA, that `fastpaths` finds the shared_prefix path working), else every row whole."""
    from .policy import causal_lm
    from .routing import recording, replaying

    lm = causal_lm(model)
    kwargs = {"output_router_logits": True} if router_logits else {}
    targets = input_ids[:, -n_targets:]                                # [B, n]
    P = input_ids.shape[1] - n_targets
    replay = (replaying(model, _route_plan(routes, shared, group_size, P)) if routes is not None
              else contextlib.nullcontext())
    record = recording(model) if record_routes else contextlib.nullcontext()
    with replay, record as recorder:
        if shared:
            head, hidden, routers, router_mask = forward_shared_prompt(model, lm, input_ids, attention_mask,
                                                                       n_targets, group_size, kwargs)
        else:
            with _lm_head_captured(lm) as (head, capture):
                out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            logits_to_keep=n_targets + 1, use_cache=False, **kwargs)
            hidden = capture.hidden[:, :-1]                            # [B, n, H]
            routers, router_mask = tuple(getattr(out, "router_logits", None) or ()), None
    used = _recorded_routes(recorder.take(), shared, group_size) if record_routes else None
    logp, ent = chunked_token_logprobs(hidden, head.weight, targets, chunk_tokens, temperature, with_entropy)
    return ForwardOut(logp, ent, routers, router_mask, used)
