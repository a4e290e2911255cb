"""The step's typed record: built from rollouts and scores by one function, sliced by rows."""

import math

import pytest
import torch

from align.grpo.trajectory import PolicyForward, build_trajectory
from align.rollout.protocol import Rollouts
from rewards.combine import RewardSpec, score


def _rollouts(N=8, G=4, P=3, C=5):
    torch.manual_seed(0)
    mask = torch.ones(N, C, dtype=torch.long)
    mask[1, 2:] = 0
    truncated = torch.zeros(N, dtype=torch.bool)
    truncated[2] = True
    return Rollouts(torch.randint(3, 99, (N, P)), torch.ones(N, P, dtype=torch.long), torch.randint(3, 99, (N, C)),
                    mask, torch.randn(N, C), truncated, [f"c{i}" for i in range(N)], G)


def some_unscored(prompts, completions, **_):
    return [{"c0": 1.0, "c1": None, "c2": 0.0, "c3": 1.0}.get(c, float(i % 2)) for i, c in enumerate(completions)]


def test_unscored_row_out_of_the_baseline_through_score_and_trajectory():
    """[1, None, 0, 1]: the None row is NaN in the total, outside its group's mean and std, advantage 0."""
    r = _rollouts()
    s = score([RewardSpec("tests.test_trajectory:some_unscored")], ["p"] * 8, r.completions, {}, [f"row {i}" for i in
              range(8)], group_size=4)
    assert math.isnan(s.total[1])
    traj, zero = build_trajectory(r, s.total, s.components, s.keep)
    assert traj.advantages[:4].tolist() == pytest.approx([0.57735, 0.0, -1.1547, 0.57735], abs=1e-4)
    assert traj.group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and not zero.any()


def test_layout_masks_and_dropped_groups():
    r = _rollouts()
    total = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])                # group 1: zero std
    keep = torch.ones(8, dtype=torch.bool)
    traj, zero = build_trajectory(r, total, {"x": total}, keep, mask_truncated=True)
    assert zero.tolist() == [False, True] and len(traj) == 8
    assert traj.input_ids.shape == (8, 8) and traj.completion_len == 5
    assert (traj.input_ids[:, 3:] == r.completion_ids).all()
    assert traj.loss_mask[2].sum() == 0 and traj.loss_mask[1].sum() == 2   # truncated row masked out
    dropped, _ = build_trajectory(r, total, {"x": total}, keep, drop_zero_std=True)
    assert len(dropped) == 4 and dropped.group.tolist() == [0, 0, 0, 0]
    assert dropped.rewards["x"].tolist() == [1.0, 0.0, 1.0, 0.0]
    kept_in, _ = build_trajectory(r, total, {"x": total}, keep, drop_zero_std=True, drop_rows=False)
    assert len(kept_in) == 8 and kept_in.loss_mask[4:].sum() == 0 and (kept_in.advantages[4:] == 0).all()


def test_slicing_cuts_every_per_row_field():
    r = _rollouts()
    total = torch.arange(8.0)
    traj, _ = build_trajectory(r, total, {"x": total}, torch.ones(8, dtype=torch.bool))
    traj.old_logprobs = torch.randn(8, 5)
    rows = torch.tensor([4, 5, 6, 7])
    part = traj[rows]
    assert part.old_logprobs.equal(traj.old_logprobs[rows]) and part.ref_logprobs is None
    assert part.total.tolist() == [4.0, 5.0, 6.0, 7.0] and part.sampling_logprobs.equal(r.sampling_logprobs[rows])


def test_policy_forward_settings_from_the_config():
    class Sampling:
        temperature = 0.0

    class Cfg:
        group_size, micro_batch_size, logprob_chunk, sampling = 4, 10, 256, Sampling()

    f = PolicyForward.of(Cfg())
    assert (f.temperature, f.micro_batch, f.group_size, f.chunk_tokens) == (1.0, 8, 4, 256)  # greedy scores at 1
