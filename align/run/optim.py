"""AdamW with linear warmup then cosine decay, shared by the SFT and GRPO stages."""

from __future__ import annotations

import math

import torch


def build_optimizer(model, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0):
    """lr multiplier: linear 0 -> 1 over `warmup_steps`, then cosine 1 -> `min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
