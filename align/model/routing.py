"""MoE routes: record which experts each token went to, replay them in another forward, freeze the router.

A DeepSeek-V2 MoE layer's gate (transformers' `DeepseekV2TopkRouter`) returns (router_logits, topk_weights,
topk_indices). Routes are the top-k indices, laid out per row and position as

    routes   [N, T, L, k]  int16, L = MoE layers in model order, −1 = no route recorded (that position is routed
                           afresh)

Recording (`recording`) keeps each gate call's indices. Replay (`replaying`) is a forward hook on each gate that
swaps in given indices and recomputes the weights as the current router's softmax scores of those experts times
`routed_scaling_factor`, so gradients still reach the router through the weights of the experts used; the router
logits (balance loss, load metrics) are the current ones. Who calls a gate how often depends on the forward
(one call over [rows, T], or a shared-prompt call over [groups, P] then one over [rows, C]); `logprobs` lays the
routes out for each. Routing replay in RL (R2: the trainer's old-policy routes; R3: the rollout engine's) follows
verl / slime ("rollout routing replay", arXiv 2510.23027).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

NO_ROUTE = -1


def gates(model) -> list[torch.nn.Module]:
    """The MoE gates of a (wrapped) DeepSeek-V2 model, in layer order."""
    return [m for m in model.modules() if type(m).__name__ == "DeepseekV2TopkRouter"]


class Recorder:
    """Collects each gate call's top-k indices, per layer: calls[l] = [[b, t, k], ...] in call order."""

    def __init__(self, n_layers: int):
        self.calls: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def take(self) -> list[list[torch.Tensor]]:
        calls, self.calls = self.calls, [[] for _ in self.calls]
        return calls


@contextlib.contextmanager
def recording(model) -> Iterator[Recorder]:
    """Record the routes of every gate call inside the block (with replay active, the replayed ones)."""
    layers = gates(model)
    recorder = Recorder(len(layers))

    def hook(layer: int):
        def record(module, args, output):
            b_t = args[0].shape[:-1]                                       # [b, t] of the layer's input
            recorder.calls[layer].append(output[2].detach().view(*b_t, -1).to(torch.int16))
        return record

    # registered after any replay hook, so what is recorded is what was used
    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(layers)]
    try:
        yield recorder
    finally:
        for h in handles:
            h.remove()


def replayed_output(module, output, routes: torch.Tensor):
    """A gate's output with `routes` [tokens, k] (NO_ROUTE: keep the gate's own choice) in place of its top-k:
    weights = softmax(router_logits) at those experts x routed_scaling_factor (differentiable in the router)."""
    logits, weights, indices = output
    routes = routes.to(indices.device).long()                              # [tokens, k]
    keep = routes < 0
    if keep.all():
        return output
    chosen = torch.where(keep, indices, routes)                            # [tokens, k]
    scores = logits.softmax(dim=-1, dtype=torch.float32)                   # [tokens, E]
    replayed = scores.gather(-1, chosen) * module.routed_scaling_factor    # [tokens, k]
    weights = torch.where(keep, weights, replayed.to(weights.dtype))
    return logits, weights, chosen


@contextlib.contextmanager
def replaying(model, plan: list[list[torch.Tensor]]):
    """Replay routes inside the block: plan[l] is the queue of [b, t, k] route tensors for layer l's gate calls,
    in call order. A call beyond its layer's queue, or of another size, is an error (the layout was wrong)."""
    layers = gates(model)
    if len(plan) != len(layers):
        raise ValueError(f"routes for {len(plan)} MoE layers, the model has {len(layers)}")
    queues = [list(q) for q in plan]

    def hook(layer: int):
        def replay(module, args, output):
            if not queues[layer]:
                raise RuntimeError(f"MoE layer {layer}: more gate calls than recorded routes")
            routes = queues[layer].pop(0)
            tokens = args[0].shape[:-1].numel()
            if routes.numel() // routes.shape[-1] != tokens:
                raise RuntimeError(f"MoE layer {layer}: routes for {routes.numel() // routes.shape[-1]} tokens, "
                                   f"the gate got {tokens}")
            return replayed_output(module, output, routes.reshape(tokens, -1))
        return replay

    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def freeze_router(model) -> int:
    """Keep every gate's weight fixed (no gradient, so no optimizer update); returns how many were frozen."""
    layers = gates(model)
    for g in layers:
        g.weight.requires_grad_(False)
    return len(layers)


def agreement(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of masked tokens whose top-k expert sets are equal in `a` and `b` [N, T, L, k], averaged over layers
    (positions with NO_ROUTE in either are not counted)."""
    same = (a.sort(-1).values == b.sort(-1).values).all(-1)               # [N, T, L]
    seen = mask.bool()[..., None] & (a >= 0).all(-1) & (b >= 0).all(-1)   # [N, T, L]
    per_layer = (same & seen).sum((0, 1)).float() / seen.sum((0, 1)).clamp_min(1)   # [L]
    return per_layer.mean().item() if seen.any() else float("nan")
