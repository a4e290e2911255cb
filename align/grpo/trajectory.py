"""One GRPO step's batch as a typed record: what was sampled, how it scored, and what the loss needs.

Rows are completions, N = B·G of them, the G completions of prompt b at rows b·G .. b·G+G−1 (the engines' layout,
`rollout.protocol`); `group[i]` says which prompt row i answers, so the layout is stated, not implied. The
trajectory is built once per step by `build_trajectory` from the rollouts and the scores; the trainer fills in the
no-grad log-probs (old, reference) and slices it into micro-batches with `traj[rows]`. `PolicyForward` is how
every forward over a trajectory (old, reference, update) computes its log-probs, with one set of settings.
"""

from __future__ import annotations

import dataclasses

import torch

from ..model.logprobs import ForwardOut, forward_logprobs
from ..rollout.protocol import Rollouts
from .core import group_advantages, zero_std_groups


@dataclasses.dataclass
class Trajectory:
    input_ids: torch.Tensor              # [N, P+C] prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor         # [N, P+C]
    loss_mask: torch.Tensor              # [N, C] 1 on the completion tokens that count in the loss (sampled ones)
    group: torch.Tensor                  # [N] index of the prompt (within the step) each row answers
    rewards: dict[str, torch.Tensor]     # component -> [N], NaN where that reward gave no score
    total: torch.Tensor                  # [N] weighted total, NaN where no reward scored the row
    advantages: torch.Tensor             # [N] group-normalised total (0 for unscored and dropped rows)
    sampling_logprobs: torch.Tensor      # [N, C] the engine's, under the distribution it sampled from
    old_logprobs: torch.Tensor | None = None   # [N, C] π_θold; None: the update's own, detached (μ = 1, one minibatch)
    ref_logprobs: torch.Tensor | None = None   # [N, C] π_ref; None with β = 0
    routes: torch.Tensor | None = None         # [N, P+C, L, k] MoE routes the forwards replay; None: route afresh
    sampler_routes: torch.Tensor | None = None  # [N, P+C, L, k] the engine's routes while sampling, when recorded

    @property
    def completion_len(self) -> int:
        """C: completion positions per row (the last C of input_ids)."""
        return self.loss_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, rows: torch.Tensor) -> Trajectory:
        """The rows `rows` (a 1-D index tensor) of every per-row field."""
        cut = {f.name: _rows(getattr(self, f.name), rows) for f in dataclasses.fields(self)}
        return Trajectory(**cut)

    def to(self, device) -> Trajectory:
        return Trajectory(**{f.name: _to(getattr(self, f.name), device) for f in dataclasses.fields(self)})


def _rows(value, rows):
    if isinstance(value, dict):
        return {k: v[rows.to(v.device)] for k, v in value.items()}
    return None if value is None else value[rows.to(value.device)]


def _to(value, device):
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return None if value is None else value.to(device)


def build_trajectory(rollouts: Rollouts, total: torch.Tensor, rewards: dict[str, torch.Tensor],
                     keep: torch.Tensor, *, scale: str = "group", drop_zero_std: bool = False,
                     mask_truncated: bool = False, drop_rows: bool = True,
                     replay_sampler_routes: bool = False) -> tuple[Trajectory, torch.Tensor]:
    """The step's trajectory and its zero-std groups [B] (bool), from the rollouts and the scores.

    advantages   group_advantages(total): NaN (unscored) rows out of their group's statistics, advantage 0
    dropped      rows of groups the scorer skipped (`keep` False) and, with `drop_zero_std`, of groups whose
                 scored rewards are all equal; `drop_rows` takes them out of the batch, else (several processes,
                 which must do equal work) they stay with advantage 0 and no token in the loss
    loss mask    the rollouts' loss mask (the sampled tokens; tool results stay in the attention mask only), minus
                 truncated completions with `mask_truncated`
    routes       the engine's (`Rollouts.routes`) kept as sampler_routes, and replayed with
                 `replay_sampler_routes` (routing_replay=rollout)
    """
    G = rollouts.group_size
    advantages = group_advantages(total, G, scale)                                  # [N]
    zero = zero_std_groups(total, G)                                                # [B]
    kept = keep & ~(zero.repeat_interleave(G) & drop_zero_std)                      # [N]
    loss_mask = rollouts.loss_mask.clone()                                          # [N, C]
    if mask_truncated:
        loss_mask[rollouts.truncated] = 0
    traj = Trajectory(
        input_ids=torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1),     # [N, P+C]
        attention_mask=torch.cat([rollouts.prompt_mask, rollouts.completion_mask], 1),
        loss_mask=loss_mask,
        group=torch.arange(len(total)) // G,                                        # [N]
        rewards=rewards, total=total, advantages=advantages,
        sampling_logprobs=rollouts.sampling_logprobs, sampler_routes=rollouts.routes,
        routes=rollouts.routes if replay_sampler_routes else None)
    if replay_sampler_routes and rollouts.routes is None:
        raise ValueError("routing_replay=rollout: the engine recorded no routes")
    if kept.all():
        return traj, zero
    if drop_rows:
        return traj[kept.nonzero().squeeze(-1)], zero
    traj.advantages = torch.where(kept, advantages, torch.zeros_like(advantages))
    traj.loss_mask = torch.where(kept[:, None], loss_mask, torch.zeros_like(loss_mask))
    return traj, zero


@dataclasses.dataclass(frozen=True)
class PolicyForward:
    """The log-prob settings shared by the old, reference and update forwards over a trajectory."""

    temperature: float    # the sampling temperature (greedy, 0, scores at 1): the distribution sampled from
    micro_batch: int      # rows per forward, whole groups
    group_size: int       # G: each group's prompt runs once (logprobs.forward_logprobs)
    chunk_tokens: int     # tokens per LM-head chunk

    @classmethod
    def of(cls, cfg) -> PolicyForward:
        G = cfg.group_size
        return cls(cfg.sampling.temperature or 1.0, max(cfg.micro_batch_size // G, 1) * G, G, cfg.logprob_chunk)

    def __call__(self, model, traj: Trajectory, **kw) -> ForwardOut:
        """Log-probs [n, C] of `traj`'s completion tokens, replaying `traj.routes` when set (one forward; kw:
        with_entropy, router_logits, record_routes)."""
        return forward_logprobs(model, traj.input_ids, traj.completion_len, traj.attention_mask,
                                chunk_tokens=self.chunk_tokens, temperature=self.temperature,
                                group_size=self.group_size, routes=traj.routes, **kw)

    @torch.no_grad()
    def no_grad(self, model, traj: Trajectory, record_routes: bool = False):
        """Log-probs [N, C] of the whole trajectory, micro_batch rows at a time, without autograd; and the routes
        used [N, P+C, L, k] with `record_routes` (else None)."""
        outs = [self(model, traj[torch.arange(s, min(s + self.micro_batch, len(traj)))], record_routes=record_routes)
                for s in range(0, len(traj), self.micro_batch)]
        routes = torch.cat([o.routes for o in outs]) if record_routes else None
        return torch.cat([o.logprobs for o in outs]), routes                       # [N, C], [N, T, L, k]
