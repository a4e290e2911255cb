"""Mixture-of-experts helpers: the paper's expert-level balance loss and expert-load statistics.

DeepSeek-V2 (§2.2.3): for one MoE layer with N_r routed experts, K_r of them selected per token, T tokens,

    L_ExpBal = α1 · Σ_i f_i · P_i,   f_i = N_r / (K_r·T) · Σ_t 1(token t selects expert i),   P_i = 1/T · Σ_t s_{i,t}

with s_{i,t} the softmax router affinity. f_i = 1 for every expert under perfect balance, so L = α1 then. We sum the
loss over MoE layers (as DeepSeek's own implementation adds one auxiliary loss per layer) and count only real
(non-padding) tokens. transformers returns `aux_loss=None` for DeepSeek-V2, so this is computed here from the router
logits it records (`output_router_logits=True`).
"""

from __future__ import annotations

import contextlib
import dataclasses

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


EXPERTS_KERNELS = ("grouped_mm", "batched_mm", "eager")


def measure_experts_impl(model, tokens: int = 4096, repeats: int = 3, cache: str | None = None) -> str:
    """The fastest routed-experts kernel for this model on its device, by timing one MoE layer's forward+backward.

    transformers' fused experts run as `grouped_mm`, `batched_mm` or `eager` loops; which one wins depends on the
    device, the dtype and the expert shapes, so `experts_impl=auto` on an accelerator measures once and caches the
    answer per (device, torch, shapes, dtype) in `cache` (default ~/.cache/align/experts_impl.json). Returns the
    kernel's name; the model is left set to it.
    """
    import json
    import os
    import time
    from pathlib import Path

    p = next(model.parameters())
    cfg = model.config
    name = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else p.device.type
    key = (f"{name}|torch {torch.__version__}|{p.dtype}|H{cfg.hidden_size} I{cfg.moe_intermediate_size} "
           f"E{cfg.n_routed_experts} k{cfg.num_experts_per_tok}|{tokens}")
    path = Path(cache or os.path.join(os.path.expanduser("~"), ".cache", "align", "experts_impl.json"))
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key in known:
        model.set_experts_implementation(known[key]["best"])
        return known[key]["best"]
    layer = next(m for m in model.modules() if type(m).__name__ == "DeepseekV2Moe")
    x = torch.randn(1, tokens, cfg.hidden_size, device=p.device, dtype=p.dtype, requires_grad=True)
    sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)
    seconds = {}
    for impl in EXPERTS_KERNELS:
        model.set_experts_implementation(impl)
        try:
            times = []
            for _ in range(repeats + 1):
                sync()
                t = time.perf_counter()
                layer(x).float().pow(2).mean().backward()
                sync()
                times.append(time.perf_counter() - t)
            seconds[impl] = sorted(times[1:])[len(times[1:]) // 2]
        except Exception:  # a kernel this build / device lacks
            continue
    best = min(seconds, key=seconds.get)
    model.set_experts_implementation(best)
    model.zero_grad(set_to_none=True)
    known[key] = {"best": best, "seconds": seconds}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
    return best


def batched_decode_wins(rows: int, config) -> bool:
    """Whether transformers' decode-time switch to `batched_mm` pays for `rows` sequences decoded together.

    `batched_mm` gathers one copy of each selected expert's weights per (token, expert) pair: rows x k copies per
    MoE layer and decode step. `grouped_mm` reads each expert the step uses once: at most E. Once rows x k exceeds E
    the gather moves more bytes than the whole layer holds; at DeepSeek-V2-Lite's widths on an H200 with 256 rows
    it made 98% of the decode time (benchmarks/gpu_decode.py: 436 ms per step, 1.6% of the bandwidth floor)."""
    return rows * config.num_experts_per_tok <= config.n_routed_experts


@contextlib.contextmanager
def decode_experts_kernel(model, rows: int):
    """Inside the block, `generate` on an accelerator keeps the model's experts kernel for decode steps where
    transformers (>= 5.x, `GenerationMixin._optimize_model_for_decode`) would switch `grouped_mm` to `batched_mm`,
    unless that switch pays for `rows` sequences (`batched_decode_wins`). The same experts compute the same sums
    either way; only the kernel differs. Where transformers has no such switch this does nothing. `model`: the
    `*ForCausalLM` itself (`policy.causal_lm` of a wrapped one), whose `generate` runs."""
    inner = model
    if not hasattr(inner, "_optimize_model_for_decode") or batched_decode_wins(rows, inner.config):
        yield
        return
    inner._optimize_model_for_decode = contextlib.nullcontext  # instance attribute over the class's method
    try:
        yield
    finally:
        del inner._optimize_model_for_decode


@dataclasses.dataclass(frozen=True)
class Router:
    """A DeepSeek-V2 policy's routing settings: what the balance loss and the load metrics need to know."""

    top_k: int       # experts per token
    routing: dict    # select_experts' method / n_group / topk_group

    def balance_loss(self, router_logits, alpha: float, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return expert_balance_loss(router_logits, self.top_k, alpha, token_mask, **self.routing)

    def load(self, router_logits, token_mask: torch.Tensor | None = None) -> dict[str, float]:
        return expert_load(router_logits, self.top_k, token_mask, **self.routing)


def router_of(model, balance_alpha: float, path: str) -> Router | None:
    """The policy's Router when it is a DeepSeek-V2 MoE, else None; a balance loss on a dense model is refused."""
    config = model.config
    if getattr(config, "model_type", None) == "deepseek_v2":
        return Router(config.num_experts_per_tok, routing_kwargs(config))
    if balance_alpha > 0:
        from ..config import ConfigError

        raise ConfigError(f"balance_alpha={balance_alpha} needs a DeepSeek-V2 MoE model; {path} is "
                          f"{config.model_type!r} (set balance_alpha=0)")
    return None
