"""Mixture-of-experts helpers: the paper's expert-level balance loss and expert-load statistics.

DeepSeek-V2 (§2.2.3): for one MoE layer with N_r routed experts, K_r of them selected per token, T tokens,

    L_ExpBal = α1 · Σ_i f_i · P_i,   f_i = N_r / (K_r·T) · Σ_t 1(token t selects expert i),   P_i = 1/T · Σ_t s_{i,t}

with s_{i,t} the softmax router affinity. f_i = 1 for every expert under perfect balance, so L = α1 then. We sum the
loss over MoE layers (as DeepSeek's own implementation adds one auxiliary loss per layer) and count only real
(non-padding) tokens. transformers returns `aux_loss=None` for DeepSeek-V2, so this is computed here from the router
logits it records (`output_router_logits=True`).
"""

from __future__ import annotations

import torch


def select_experts(scores: torch.Tensor, top_k: int, method: str = "greedy", n_group: int | None = None,
                   topk_group: int | None = None) -> torch.Tensor:
    """Indices [T, K] of the experts DeepSeek-V2's router selects from softmax scores [T, E]."""
    if method == "group_limited_greedy" and n_group and n_group > 1:
        t, e = scores.shape
        group_scores = scores.view(t, n_group, e // n_group).max(dim=-1).values          # [T, G]
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1).indices                # [T, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)           # [T, G]
        score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        scores = scores.masked_fill(score_mask == 0, 0.0)
    return torch.topk(scores, k=top_k, dim=-1).indices


def _layer_stats(logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None, **routing):
    scores = torch.softmax(logits.float(), dim=-1)                                        # [T, E]
    if token_mask is not None:
        scores = scores[token_mask.reshape(-1).bool()]
    n_tokens, n_experts = scores.shape
    chosen = select_experts(scores.detach(), top_k, **routing)                            # [T, K]
    counts = torch.zeros(n_experts, device=scores.device).scatter_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), device=scores.device))          # [E]
    f = counts * n_experts / (top_k * max(n_tokens, 1))                                   # [E]
    p = scores.mean(dim=0)                                                                # [E]
    return f, p


def expert_balance_loss(router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], top_k: int, alpha: float,
                        token_mask: torch.Tensor | None = None, **routing) -> torch.Tensor:
    """α · Σ_layers Σ_i f_i P_i. router_logits: per MoE layer [T, E]; token_mask: [T] (1 = real token)."""
    total = torch.zeros(())
    for logits in router_logits:
        f, p = _layer_stats(logits, top_k, token_mask, **routing)
        total = total.to(p.device) + (f * p).sum()
    return alpha * total


def expert_load(router_logits, top_k: int, token_mask: torch.Tensor | None = None, **routing) -> dict[str, float]:
    """Load metrics over MoE layers: f_i as above (1.0 = perfectly balanced)."""
    if not router_logits:
        return {}
    fs = torch.stack([_layer_stats(lg.detach(), top_k, token_mask, **routing)[0] for lg in router_logits])  # [L, E]
    return {"moe/load_max": fs.max(dim=1).values.mean().item(),
            "moe/load_min": fs.min(dim=1).values.mean().item(),
            "moe/load_cv": (fs.std(dim=1) / fs.mean(dim=1).clamp_min(1e-9)).mean().item()}


def routing_kwargs(config) -> dict:
    """The routing settings of a DeepSeek-V2 config, as `select_experts` takes them."""
    return {"method": getattr(config, "topk_method", "greedy"), "n_group": getattr(config, "n_group", None),
            "topk_group": getattr(config, "topk_group", None)}
