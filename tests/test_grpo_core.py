"""GRPO maths against hand-computed values and simple reference implementations."""

import math

import pytest
import torch

from align.grpo.core import (
    LossSettings,
    aggregate,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    grpo_token_loss,
    k3_kl,
    mismatch_stats,
    tis_weights,
    zero_std_groups,
)


def test_advantages_hand_computed():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) -> ±0.5*sqrt(3)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    s = 0.5 * math.sqrt(3)
    assert torch.allclose(adv, torch.tensor([s, -s, -s, s]), atol=1e-6)


def test_advantages_all_equal_group_is_zero_not_nan():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0]), 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert torch.allclose(adv[3:], torch.tensor([-1.0, 0.0, 1.0]))
    assert not adv.isnan().any()
    assert zero_std_groups(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0]), 3).tolist() == [True, False]


def test_advantages_single_outlier():
    # [0,0,0,4]: mean 1, unbiased std sqrt(12/3)=2 -> [-0.5,-0.5,-0.5,1.5]
    adv = group_advantages(torch.tensor([0.0, 0.0, 0.0, 4.0]), 4)
    assert torch.allclose(adv, torch.tensor([-0.5, -0.5, -0.5, 1.5]))


def test_advantages_without_std_division():
    adv = group_advantages(torch.tensor([0.0, 0.0, 0.0, 4.0]), 4, scale="none")
    assert torch.allclose(adv, torch.tensor([-1.0, -1.0, -1.0, 3.0]))


def test_group_size_one_refused():
    with pytest.raises(ValueError, match="G=1"):
        group_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.tensor([1.0, 2.0]), 3)


def test_k3_hand_computed_and_zero_at_equality():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # ref/θ = 0.5: 0.5 - log(0.5) - 1
    assert torch.allclose(k3_kl(lp, ref), torch.tensor([0.5 - math.log(0.5) - 1]))
    x = torch.randn(4, 5)
    assert torch.equal(k3_kl(x, x), torch.zeros(4, 5))
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))        # ratios
    # A = +1: -min(ρ, clip(ρ, 0.8, 1.2)) = [-0.5, -0.9, -1.1, -1.2]
    loss, ratio, clipped = clipped_surrogate(lp, old, torch.tensor([1.0]), LossSettings(eps_low=0.2, eps_high=0.2))
    assert torch.allclose(loss, torch.tensor([[-0.5, -0.9, -1.1, -1.2]]), atol=1e-6)
    assert clipped.tolist() == [[False, False, False, True]]
    # A = -1: -min(-ρ, -clip(ρ)) = max(ρ, clip(ρ)) = [0.8, 0.9, 1.1, 1.5]
    loss, _, clipped = clipped_surrogate(lp, old, torch.tensor([-1.0]), LossSettings(eps_low=0.2, eps_high=0.2))
    assert torch.allclose(loss, torch.tensor([[0.8, 0.9, 1.1, 1.5]]), atol=1e-6)
    assert clipped.tolist() == [[True, False, False, False]]
    # separate high clip (DAPO clip-higher): 1.5 clipped at 1.28 for A>0
    loss, _, _ = clipped_surrogate(lp, old, torch.tensor([1.0]), LossSettings(eps_low=0.2, eps_high=0.28))
    assert loss[0, 3].item() == pytest.approx(-1.28, abs=1e-6)


def test_aggregations_hand_computed():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    num, den = aggregate(per_token, mask, "sequence_mean")
    assert (num / den).item() == pytest.approx((2.0 + 4.0) / 2)
    num, den = aggregate(per_token, mask, "token_mean")
    assert (num / den).item() == pytest.approx(10.0 / 4)
    num, den = aggregate(per_token, mask, "constant", max_tokens=5)
    assert (num / den).item() == pytest.approx(10.0 / (2 * 5))
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(per_token, mask, "median")


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean", "constant"])
def test_microbatch_split_equals_full_batch(mode):
    torch.manual_seed(0)
    per_token = torch.randn(6, 7)
    mask = (torch.rand(6, 7) > 0.3).long()
    num, den = aggregate(per_token, mask, mode, 7)
    parts = [aggregate(per_token[i:i + 2], mask[i:i + 2], mode, 7) for i in (0, 2, 4)]
    total_den = sum(p[1] for p in parts)
    assert torch.allclose(sum(p[0] / total_den for p in parts), num / den)


def _reference_loss(lp, old, ref, adv, mask, beta, eps):
    """A plain loop over outputs and tokens, written straight from DeepSeekMath's objective."""
    total = 0.0
    for i in range(len(lp)):
        toks = [t for t in range(len(lp[i])) if mask[i][t]]
        s = 0.0
        for t in toks:
            r = math.exp(lp[i][t] - old[i][t])
            surr = min(r * adv[i], max(min(r, 1 + eps), 1 - eps) * adv[i])
            q = math.exp(ref[i][t] - lp[i][t])
            s += -(surr - beta * (q - math.log(q) - 1))
        total += s / len(toks)
    return total / len(lp)


def test_grpo_loss_matches_reference_implementation():
    torch.manual_seed(1)
    lp, old, ref = torch.randn(4, 6) * 0.3 - 1, torch.randn(4, 6) * 0.3 - 1, torch.randn(4, 6) * 0.3 - 1
    adv = torch.randn(4)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    got = grpo_loss(lp, old, ref, adv, mask, LossSettings(beta=0.04, eps_low=0.2, eps_high=0.2))
    want = _reference_loss(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.04, 0.2)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_ratio_one_and_kl_zero_at_identity():
    lp = torch.randn(3, 5, requires_grad=True)
    per_token, stats = grpo_token_loss(lp, lp.detach(), lp.detach(), torch.tensor([1.0, -1.0, 0.5]),
                                       torch.ones(3, 5), LossSettings(beta=0.04))
    assert torch.equal(stats["ratio"], torch.ones(3, 5))
    assert torch.equal(stats["kl"], torch.zeros(3, 5))
    # gradient of the surrogate at ρ = 1 is −A ∇log π (per token, before aggregation)
    per_token.sum().backward()
    assert torch.allclose(lp.grad, -torch.tensor([1.0, -1.0, 0.5]).unsqueeze(1).expand(3, 5))


# -- truncated importance sampling (vLLM / trainer mismatch)

def test_tis_weights_hand_values():
    old = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.3)]])
    samp = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.6)]])
    w = tis_weights(old, samp, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 0.5]]), atol=1e-6)  # 1, min(3, 2), 0.5
    assert torch.equal(tis_weights(old, samp, cap=0), torch.ones_like(old))


def test_tis_weights_are_detached_and_scale_only_the_surrogate():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logprobs.detach()
    samp = old - torch.tensor([[math.log(2.0), 0.0]])        # sampler was 2x less likely on token 0
    ref = old + 0.1
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    w = tis_weights(old, samp, cap=5.0)
    assert not w.requires_grad
    weighted, _ = grpo_token_loss(logprobs, old, ref, adv, mask, LossSettings(beta=0.5), weights=w)
    plain, stats = grpo_token_loss(logprobs, old, ref, adv, mask, LossSettings(beta=0.5))
    kl_part = 0.5 * stats["kl"]
    assert torch.allclose(weighted - kl_part, (plain - kl_part) * w)
    assert torch.allclose(weighted[0, 1], plain[0, 1])


def test_mismatch_stats_hand_values():
    old = torch.tensor([[-1.0, -1.0, -5.0]])
    samp = torch.tensor([[-1.5, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    s = mismatch_stats(old, samp, mask, cap=math.exp(0.4))
    assert s["rollout/logprob_gap"] == pytest.approx(0.5)
    d = torch.tensor([0.5, -0.5])
    assert s["rollout/kl_sampler"] == pytest.approx((torch.exp(d) - d - 1).mean().item())
    assert s["rollout/tis_clip_frac"] == pytest.approx(0.5)
    assert mismatch_stats(old, samp, torch.zeros(1, 3), 2.0) == {}


def test_unscored_completions_are_left_out_of_the_baseline():
    """Issue 15's case: rewards [1, None, 0, 1] through score() and group_advantages give TRL's advantages; the
    unscored row is neither counted as 0 nor given a signal."""
    from rewards.combine import RewardSpec, score
    from rewards.registry import reward

    @reward("test_one_unscored")
    def one_unscored(prompts, completions, **_):
        return [1.0, None, 0.0, 1.0]

    s = score([RewardSpec(name="test_one_unscored")], ["p"] * 4, list("abcd"), {}, ["r"] * 4, 4)
    assert s.total[1].isnan() and s.metrics()["reward/total"] == pytest.approx(2 / 3)
    adv = group_advantages(s.total, 4)
    assert adv.tolist() == pytest.approx([3 ** -0.5, 0.0, -2 * 3 ** -0.5, 3 ** -0.5], abs=1e-6)
    assert not zero_std_groups(s.total, 4).any()
    assert zero_std_groups(torch.tensor([1.0, float("nan"), 1.0, float("nan")]), 4).all()
    assert group_advantages(torch.tensor([float("nan")] * 4), 4).tolist() == [0.0] * 4


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant"])
def test_nan_in_padding_and_extreme_ratios_keep_the_loss_finite(aggregation):
    logprobs = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, 95.0, -1.0]], requires_grad=True)  # [2, 3]
    old = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])                      # the NaN sits in padding
    adv = torch.tensor([1.0, -1.0])
    loss = grpo_loss(logprobs, old, old, adv, mask, LossSettings(beta=0.0, aggregation=aggregation))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    ratio = clipped_surrogate(logprobs.detach(), old, adv, LossSettings(eps_low=0.2, eps_high=0.2))[1]
    assert ratio[1, 1] == pytest.approx(math.exp(20.0))              # log ρ = 96 bounded at 20


def test_gspo_hand_computed_and_against_a_reference_loop():
    from align.grpo.core import gspo_surrogate

    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.0, -2.8], [-0.5, -0.7, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0])
    loss, ratio, clipped = gspo_surrogate(logprobs, old, adv, LossSettings(eps_low=0.05, eps_high=0.05), mask=mask)
    # row 0: mean log ρ = (0.2 + 0 - 0.2) / 3 = 0 -> s = 1; row 1: (0 + 0.2) / 2 = 0.1 -> s = e^0.1 = 1.105
    assert ratio[0, 0].item() == pytest.approx(1.0) and ratio[1, 0].item() == pytest.approx(math.exp(0.1))
    # row 1: A < 0, s > 1 + ε: min(s A, 1.05 A) = s A (the unclipped, more negative) -> loss = s
    assert loss[1, 0].item() == pytest.approx(math.exp(0.1)) and not clipped[1, 0]
    for i in range(2):  # reference: per sequence, in plain Python
        n = int(mask[i].sum())
        s = math.exp(sum(logprobs[i, t].item() - old[i, t].item() for t in range(n)) / n)
        a = adv[i].item()
        ref = -min(s * a, min(max(s, 0.95), 1.05) * a)
        assert loss[i, 0].item() == pytest.approx(ref)
    total = grpo_loss(logprobs, old, None, adv, mask,
                      LossSettings(beta=0.0, policy_loss="gspo", eps_low=0.05, eps_high=0.05))
    assert total.item() == pytest.approx((loss[0, 0].item() + loss[1, 0].item()) / 2)
    total.backward()  # the gradient reaches every token of a sequence through its mean log-ratio
    assert (logprobs.grad[1, :2] != 0).all() and logprobs.grad[1, 2] == 0


def test_cispo_hand_computed_and_against_a_reference_loop():
    from align.grpo.core import cispo_surrogate

    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0]])                                  # ρ = e^0.5 = 1.65 (capped at 1.2), 1
    adv = torch.tensor([1.0])
    loss, ratio, capped = cispo_surrogate(logprobs, old, adv, LossSettings(eps_low=None, eps_high=0.2))
    assert loss[0].tolist() == pytest.approx([1.2 * 1.0, 1.0 * 2.0])    # −w A log π
    assert capped.tolist() == [[True, False]]
    loss.sum().backward()
    assert logprobs.grad[0].tolist() == pytest.approx([-1.2, -1.0])     # −w A: the capped token keeps a gradient
    for t in range(2):
        w = min(math.exp(logprobs[0, t].item() - old[0, t].item()), 1.2)
        assert loss[0, t].item() == pytest.approx(-w * adv[0].item() * logprobs[0, t].item())


def test_policy_loss_combinations_are_checked_by_key(tiny_dir, tmp_path):
    from align.config import ConfigError, load_config
    from align.grpo.config import GRPOConfig

    base = [f"model.path={tiny_dir}", f"output_dir={tmp_path}/r", "train_data=[x.jsonl]",
            "rewards=[{name: exact_answer}]"]
    with pytest.raises(ConfigError, match=r"key 'aggregation' must be sequence_mean with policy_loss=gspo"):
        load_config(GRPOConfig, None, base + ["policy_loss=gspo", "aggregation=token_mean"])
    with pytest.raises(ConfigError, match=r"key 'clip_eps_low' must be unset with policy_loss=cispo"):
        load_config(GRPOConfig, None, base + ["policy_loss=cispo", "clip_eps_low=0.2"])
    with pytest.raises(ConfigError, match=r"key 'policy_loss' must be one of"):
        load_config(GRPOConfig, None, base + ["policy_loss=ppo2"])
    g = load_config(GRPOConfig, None, base + ["policy_loss=gspo"])
    assert (g.clip_eps_low, g.clip_eps_high) == (3e-4, 4e-4)
    c = load_config(GRPOConfig, None, base + ["policy_loss=cispo"])
    assert (c.clip_eps_low, c.clip_eps_high) == (None, 0.2)
    d = load_config(GRPOConfig, None, base)
    assert (d.policy_loss, d.clip_eps_low, d.clip_eps_high) == ("clip", 0.2, 0.2)
