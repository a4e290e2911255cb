"""GRPO's maths as pure functions on tensors (DeepSeekMath §4.1, arXiv 2402.03300; DeepSeek-V2 §4.2).

For a prompt q with G sampled outputs o_1..o_G and rewards r_1..r_G:

    A_i      = (r_i − mean(r)) / std(r)                          group_advantages   (scale="group")
    ρ_i,t    = π_θ(o_i,t | q, o_i,<t) / π_θold(o_i,t | q, o_i,<t)
    L_i,t    = −min(ρ_i,t A_i, clip(ρ_i,t, 1−ε_low, 1+ε_high) A_i) + β · D_KL,i,t
    D_KL,i,t = π_ref/π_θ − log(π_ref/π_θ) − 1                     k3_kl  (unbiased, ≥ 0)

(`policy_loss=clip`, the paper's). Two other surrogates by name (POLICY_LOSSES): `gspo` (one length-normalised ratio
per completion, clipped per sequence) and `cispo` (the clipped importance weight, detached, times log π_θ);

and the loss aggregates L over tokens and outputs (AGGREGATIONS, chosen by name):
    "sequence_mean"  1/G Σ_i 1/|o_i| Σ_t L_i,t        DeepSeekMath's objective (the default)
    "token_mean"     Σ_i Σ_t L_i,t / Σ_i |o_i|        DAPO (longer outputs weigh more)
    "constant"       Σ_i Σ_t L_i,t / (G' · T_max)     Dr. GRPO (no length normalisation bias); G' = completions
                                                      with at least one counted token, T_max = max_new_tokens

|log ρ| is clamped at 20 (as verl) and masked positions are selected out with `where`, so a NaN in padding or an
extreme ratio cannot make the loss NaN. Deviations, each optional: std is the unbiased sample std (as TRL), a group whose rewards are all equal gets
advantage 0 rather than 0/0, and a completion no reward scored (NaN) is left out of its group's mean and std and
gets advantage 0 (TRL's rule); scale="none" drops the std division (Dr. GRPO); ε_low and ε_high may differ (DAPO's
clip-higher).

Rollout/trainer mismatch (a vLLM engine samples with other kernels and precision than the trainer's forward pass):
truncated importance sampling (Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy RL
training") multiplies each token's loss by a detached weight

    w_t = min(π_θold(o_t) / π_sampler(o_t), C)                   tis_weights

so the gradient estimates the objective under π_θold although the tokens were drawn from π_sampler. With the
transformers engine π_sampler = π_θold to ~1e-6 and w = 1.

Each aggregation returns (numerator, denominator) so that a batch split into micro-batches sums numerators and
denominators separately and gets exactly the full-batch loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch


def group_zscore(values: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """(v − mean) / std within each of the N/G groups of G consecutive rows, NaN meaning "no score": such rows are
    left out of their group's mean and std and stay NaN. std is the unbiased sample std; a group whose scored values
    are all equal (or that has one) gives 0. scale="none": centred only. Serves both the advantages and the
    `normalize` reward mode (`normalized_total`)."""
    if scale not in ("group", "none"):
        raise ValueError(f"unknown advantage scale {scale!r}; expected 'group' or 'none'")
    v = values.float().view(-1, group_size)                                # [B, G]
    ok = ~v.isnan()                                                        # [B, G]
    n = ok.sum(1, keepdim=True)                                            # [B, 1]
    mean = torch.where(ok, v, 0.0).sum(1, keepdim=True) / n.clamp_min(1)   # [B, 1]
    centred = torch.where(ok, v - mean, 0.0)                               # [B, G]
    if scale == "none":
        z = centred
    else:
        std = (centred.pow(2).sum(1, keepdim=True) / (n - 1).clamp_min(1)).sqrt()  # [B, 1]
        z = torch.where((std > eps) & (n > 1), centred / std.clamp_min(eps), torch.zeros_like(centred))
    return torch.where(ok, z, torch.full_like(z, math.nan)).view(-1)       # [N]


def normalized_total(components: dict[str, torch.Tensor], weights: dict[str, float], group_size: int) -> torch.Tensor:
    """reward_mode=normalize (GDPO-style): Σ_k c_k z_k with each component z-scored within its group, so a
    component with a large scale cannot drown the others. A None (NaN) score is its group's mean for that component
    (z = 0); NaN where no component scored the row. components: name -> [N]."""
    total = torch.zeros_like(next(iter(components.values())), dtype=torch.float)   # [N]
    scored = torch.zeros(total.shape, dtype=torch.bool)                             # [N]
    for name, values in components.items():
        z = group_zscore(values, group_size)                                        # [N]
        total += weights[name] * torch.nan_to_num(z, nan=0.0)
        scored |= ~z.isnan()
    return torch.where(scored, total, torch.full_like(total, math.nan))


def weighted_sum(components: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ_k c_k r_k over the components that scored each row, NaN where none did ([N]; normalize mode logs its mean
    as reward/weighted, since the normalised total's group means are ~0)."""
    values = list(components.items())
    raw = sum(weights[k] * torch.nan_to_num(v.float(), nan=0.0) for k, v in values)            # [N]
    scored = torch.stack([~v.isnan() for _, v in values]).any(0)                              # [N]
    return torch.where(scored, raw, torch.full_like(raw, math.nan))


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Advantages [N] from rewards [N] laid out as N/G groups of G consecutive rows. A NaN reward (no reward
    scored that completion) is left out of its group's statistics and gets advantage 0 (TRL's rule)."""
    if group_size < 2:
        raise ValueError(f"group_size G={group_size}: GRPO needs at least 2 samples per prompt to compare them")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return torch.nan_to_num(group_zscore(rewards, group_size, scale, eps), nan=0.0)   # [N]


def zero_std_groups(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """[B] bool: groups whose scored rewards are all equal (they carry no learning signal); NaN = unscored."""
    v = rewards.float().view(-1, group_size)                               # [B, G]
    ok = ~v.isnan()
    hi = torch.where(ok, v, -math.inf).amax(1)
    lo = torch.where(ok, v, math.inf).amin(1)
    return ~(hi - lo > eps) | (ok.sum(1) < 2)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref): exp(ref − θ) − (ref − θ) − 1, shape of the inputs."""
    delta = ref_logprobs - logprobs                                        # [N, T]
    return torch.exp(delta) - delta - 1


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The GRPO loss's settings, fixed for a run: built once from the config (`GRPOConfig.loss_settings`) and
    handed to `grpo_loss`, which hands it to the surrogate. A surrogate with a knob of its own adds a field here;
    the other surrogates' signatures stay as they are."""

    policy_loss: str = "clip"           # the surrogate, a name in POLICY_LOSSES
    beta: float = 0.04                  # weight of the k3 KL penalty to π_ref (0: none)
    eps_low: float | None = 0.2         # lower clip of ρ (None: no lower clip, CISPO)
    eps_high: float = 0.2               # upper clip of ρ
    aggregation: str = "sequence_mean"  # over tokens and completions, a name in AGGREGATIONS
    max_tokens: int | None = None       # the constant of aggregation=constant (None: the batch's width)


LOG_RATIO_BOUND = 20.0  # |log ρ| beyond this is clamped (as verl): ρ = e^88 would overflow fp32 to inf, then NaN


def _log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    return (logprobs - old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)      # [N, T] exp never overflows


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      settings: LossSettings = LossSettings(), mask: torch.Tensor | None = None):
    """policy_loss=clip (DeepSeekMath / PPO): per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) [N, T], the ratio ρ
    [N, T], and where the clipped branch was taken [N, T]."""
    eps_low, eps_high = settings.eps_low, settings.eps_high
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs))                  # [N, T]
    adv = advantages.unsqueeze(-1)                                         # [N, 1]
    unclipped = ratio * adv                                                # [N, T]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv          # [N, T]
    loss = -torch.minimum(unclipped, clipped)                              # [N, T]
    return loss, ratio, clipped < unclipped


def gspo_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   settings: LossSettings = LossSettings(eps_low=3e-4, eps_high=4e-4),
                   mask: torch.Tensor | None = None):
    """policy_loss=gspo (Zheng et al., 2025, "Group Sequence Policy Optimization"): one ratio per completion,
    s_i = exp(mean over its tokens of log ρ_i,t), and the loss −min(s_i A_i, clip(s_i, 1−ε_low, 1+ε_high) A_i) set
    on each of its tokens, so `sequence_mean` aggregation gives the per-sequence objective. Returns the per-token
    loss [N, T], s_i broadcast [N, T], and where the clipped branch was taken [N, T]."""
    eps_low, eps_high = settings.eps_low, settings.eps_high
    m = torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype)     # [N, T]
    log_ratio = torch.where(m.bool(), _log_ratio(logprobs, old_logprobs), 0.0)     # [N, T]
    seq = log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)   # [N, 1] mean log ρ
    ratio = torch.exp(seq).expand_as(logprobs)                             # [N, T]
    adv = advantages.unsqueeze(-1)                                         # [N, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), ratio, clipped < unclipped


def cispo_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    settings: LossSettings = LossSettings(eps_low=None), mask: torch.Tensor | None = None):
    """policy_loss=cispo (MiniMax-M1, 2025): per-token −sg(min(ρ, 1+ε_high)) · A · log π_θ(o_t): the importance
    weight is clipped from above and detached, so every token keeps a gradient (no lower clip; ε_low unused).
    Returns the per-token loss [N, T], ρ [N, T], and where the weight hit its cap [N, T]."""
    cap = 1 + settings.eps_high
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs))                  # [N, T]
    weight = torch.clamp(ratio, max=cap).detach()                          # [N, T]
    loss = -weight * advantages.unsqueeze(-1) * logprobs                   # [N, T]
    return loss, ratio, ratio > cap


POLICY_LOSSES: dict[str, Callable] = {"clip": clipped_surrogate, "gspo": gspo_surrogate, "cispo": cispo_surrogate}

# ε defaults per policy loss where the config leaves them unset (GSPO's paper: 3e-4 / 4e-4; CISPO has no lower clip)
CLIP_DEFAULTS = {"clip": (0.2, 0.2), "gspo": (3e-4, 4e-4), "cispo": (None, 0.2)}


def tis_weights(old_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(exp(old − sampling), cap) [N, T], detached; cap <= 0 gives all ones."""
    if cap <= 0:
        return torch.ones_like(old_logprobs)
    log_w = (old_logprobs - sampling_logprobs).detach()                    # [N, T]
    return torch.exp(log_w.clamp(max=math.log(cap)))                       # [N, T]


def mismatch_stats(old_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor,
                   cap: float) -> dict[str, float]:
    """How far the engine's sampling log-probs are from the trainer's, over masked tokens.

    rollout/logprob_gap    mean |log π_θold − log π_sampler|
    rollout/kl_sampler     k3 estimate of KL(π_sampler ‖ π_θold) (tokens were drawn from π_sampler)
    rollout/tis_clip_frac  share of tokens whose weight hit the cap
    """
    m = mask.bool()
    if not m.any():
        return {}
    old, samp = old_logprobs.detach()[m].float(), sampling_logprobs.detach()[m].float()
    delta = old - samp
    out = {"rollout/logprob_gap": delta.abs().mean().item(),
           "rollout/kl_sampler": (torch.exp(delta) - delta - 1).mean().item()}
    if cap > 0:
        out["rollout/tis_clip_frac"] = (delta > math.log(cap)).float().mean().item()
    return out


def _masked(per_token, mask):
    """per_token where mask, else 0: a NaN or inf at a padded position does not reach the sum (a product would)."""
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token))   # [N, T]


def _per_sequence_mean(per_token, mask):
    return (_masked(per_token, mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).sum()   # Σ_i mean_t L_i,t


def _token_sum(per_token, mask):
    return _masked(per_token, mask).sum()                                  # Σ_i Σ_t L_i,t


def _nonempty_rows(mask, max_tokens):
    return (mask.sum(dim=1) > 0).sum()                                     # G'


def _tokens(mask, max_tokens):
    return mask.sum()                                                      # Σ_i |o_i|


def _nonempty_rows_x_max(mask, max_tokens):
    return (mask.sum(dim=1) > 0).sum() * max_tokens                        # G' · T_max


# name: (numerator from the per-token loss, denominator from the mask alone)
AGGREGATIONS: dict[str, tuple[Callable, Callable]] = {
    "sequence_mean": (_per_sequence_mean, _nonempty_rows),
    "token_mean": (_token_sum, _tokens),
    "constant": (_token_sum, _nonempty_rows_x_max),
}


def _aggregation(mode: str) -> tuple[Callable, Callable]:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[mode]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_tokens: int = 1):
    """(numerator, denominator) of the loss; mask [N, T] is 1 on tokens that count."""
    numerator, _ = _aggregation(mode)
    mask = mask.to(per_token.dtype)
    return numerator(per_token, mask), loss_denominator(mask, mode, max_tokens)


def loss_denominator(completion_mask: torch.Tensor, aggregation: str, max_tokens: int) -> torch.Tensor:
    """The denominator of `aggregation` from the mask alone (a loop sums it over micro-batches and processes and
    passes the total to `grpo_loss`)."""
    _, denominator = _aggregation(aggregation)
    return denominator(completion_mask.float(), max_tokens).float()


def grpo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                    advantages: torch.Tensor, completion_mask: torch.Tensor,
                    settings: LossSettings = LossSettings(),
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO loss [N, T] and per-token statistics (kl, ratio, clipped) for logging.

    `settings.policy_loss` names the surrogate (POLICY_LOSSES: clip, gspo, cispo). `weights` [N, T] (detached,
    e.g. `tis_weights`) multiply the surrogate term, not the KL penalty, which is added here (β read here only).
    """
    if settings.policy_loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {settings.policy_loss!r}; expected one of {sorted(POLICY_LOSSES)}")
    surrogate, ratio, clipped = POLICY_LOSSES[settings.policy_loss](logprobs, old_logprobs, advantages, settings,
                                                                    mask=completion_mask)
    per_token = surrogate if weights is None else surrogate * weights     # [N, T]
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None and settings.beta:
        kl = k3_kl(logprobs, ref_logprobs)                                 # [N, T]
        per_token = per_token + settings.beta * kl
    return _masked(per_token, completion_mask), {"kl": kl.detach(), "ratio": ratio.detach(),
                                                  "clipped": clipped.detach()}


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, completion_mask,
              settings: LossSettings = LossSettings(), weights: torch.Tensor | None = None,
              denominator: torch.Tensor | None = None, with_stats: bool = False):
    """The GRPO loss (to minimise): aggregate(grpo_token_loss) / denominator.

    `denominator`: the whole batch's (from `loss_denominator`, summed over micro-batches and processes), so that
    the micro-batch losses add up to the batch loss; default this batch's own. `with_stats`: also return the
    per-token statistics (kl, ratio, clipped) of `grpo_token_loss`."""
    per_token, stats = grpo_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, completion_mask, settings,
                                       weights)
    num, den = aggregate(per_token, completion_mask, settings.aggregation, settings.max_tokens or logprobs.shape[1])
    loss = num / (den.clamp_min(1) if denominator is None else denominator)
    return (loss, stats) if with_stats else loss
