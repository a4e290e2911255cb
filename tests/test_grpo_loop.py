"""GRPO on the tiny model: identities at the first step, the direction of one update, resume, bad input."""

import math

import pytest
import torch

from align.config import ConfigError, load_config
from align.grpo.config import GRPOConfig
from align.grpo.loop import _update, train_grpo
from align.grpo.trajectory import PolicyForward, Trajectory
from align.model.logprobs import forward_logprobs
from align.run.metrics import read_metrics
from rewards import RewardError

from .conftest import DATA, interrupted_copy, write_jsonl


def char_count(prompts, completions, **_):
    """A reward with spread even for a random-weight model."""
    return [float(len(c)) for c in completions]


def _traj(ids, completion_mask, advantages, G, **kw) -> Trajectory:
    """A trajectory over fixed token ids (the last completion_mask.shape[1] of each row are the completion)."""
    return Trajectory(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=completion_mask,
                      group=torch.arange(len(ids)) // G, rewards={}, total=advantages, advantages=advantages,
                      sampling_logprobs=kw.pop("sampling_logprobs", torch.zeros(completion_mask.shape)), **kw)


def _run(model, cfg, optimizer=None, accelerator=None):
    """The shared trainer's Run around a bare model, for calling `_update` directly."""
    from accelerate import Accelerator

    from align.run.optim import build_optimizer, warmup_cosine
    from align.run.trainer import Run

    opt = optimizer or build_optimizer(model, 1e-3, 0.0)
    return Run("grpo", cfg, accelerator or Accelerator(cpu=True), model, opt, warmup_cosine(opt, 1, 0, 1.0),
               None, None, 0, {}, False)


def _cfg(model, out, *extra):
    return load_config(GRPOConfig, None, [
        f"model.path={model}", f"output_dir={out}", f"train_data=[{DATA}/arith/rl_prompts.jsonl]",
        "rewards=[{name: exact_answer, weight: 1.0}, {name: 'tests.test_grpo_loop:char_count', weight: 0.1}]", "group_size=4", "prompts_per_step=2", "steps=2",
        "sampling.max_new_tokens=8", "lr=1e-3", "save_every=1", "keep_last=0", "micro_batch_size=3", *extra])


@pytest.mark.parametrize("lora", [False, True])
def test_first_step_ratio_one_and_kl_zero(tiny_dir, tmp_path, lora):
    # policy = reference = old policy at the first step (LoRA: B = 0 so adapters-off is the same model)
    train_grpo(_cfg(tiny_dir, tmp_path / "r", "steps=1", f"model.lora.enabled={str(lora).lower()}"))
    first = read_metrics(tmp_path / "r")[0]
    assert first["reward/total_std"] > 0 and first["train/grad_norm"] > 0
    assert first["loss/kl"] == 0.0  # π_ref (a separate copy, or adapters off) scores what π_θ does
    assert first["rollout/logprob_gap"] < 1e-3  # HF sampling log-probs agree with the trainer's (fp32)


def test_multiple_inner_epochs_use_precomputed_old_logprobs(tiny_dir, tmp_path):
    train_grpo(_cfg(tiny_dir, tmp_path / "r", "steps=1", "inner_epochs=2", "minibatches=2", "beta=0"))
    m = read_metrics(tmp_path / "r")[0]
    assert m["policy/ratio"] != 1.0  # later minibatches see a moved policy against fixed old log-probs
    assert abs(m["policy/ratio"] - 1.0) < 0.5


def test_one_update_moves_logprobs_in_the_advantage_direction(tiny_dir):
    from align.model.policy import ModelConfig, load_policy

    torch.manual_seed(0)
    model = load_policy(ModelConfig(path=str(tiny_dir)))
    cfg = _cfg(tiny_dir, "unused", "beta=0", "micro_batch_size=8", "group_size=2")
    ids = torch.randint(3, 1000, (2, 12))
    traj = _traj(ids, torch.ones(2, 5), torch.tensor([1.0, -1.0]), G=2)
    before = forward_logprobs(model, ids, 5).logprobs.sum(1).detach()
    _update(_run(model, cfg), traj, cfg, PolicyForward.of(cfg), torch.Generator().manual_seed(0), 1)
    after = forward_logprobs(model, ids, 5).logprobs.sum(1).detach()
    assert after[0] > before[0]  # positive advantage: more likely
    assert after[1] < before[1]  # negative advantage: less likely


def test_precomputed_old_logprobs_equal_the_update_forward(tiny_dir):
    """π_θold computed once, no grad, micro-batched (`PolicyForward.no_grad`) is what the update's own forward
    gives before the policy moves: ρ = 1 and nothing clipped, measured, not by construction (old is passed in)."""
    from align.model.policy import ModelConfig, load_policy

    torch.manual_seed(0)
    model = load_policy(ModelConfig(path=str(tiny_dir)))
    cfg = _cfg(tiny_dir, "unused", "beta=0", "micro_batch_size=4", "group_size=4")
    prompts = torch.randint(3, 1000, (2, 7)).repeat_interleave(4, 0)                 # 2 groups of G = 4
    ids = torch.cat([prompts, torch.randint(3, 1000, (8, 5))], 1)
    traj = _traj(ids, torch.ones(8, 5), torch.randn(8), G=4)
    forward = PolicyForward.of(cfg)
    traj.old_logprobs, _ = forward.no_grad(model, traj)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)                              # the policy does not move
    stats = _update(_run(model, cfg, frozen), traj, cfg, forward, torch.Generator().manual_seed(0), 1)
    assert stats["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["loss/clip_frac"] == 0.0


def test_resume_reproduces_the_uninterrupted_run(tiny_dir, tmp_path):
    full = tmp_path / "full"
    train_grpo(_cfg(tiny_dir, full, "steps=3"))
    cut = interrupted_copy(full, tmp_path / "cut", last_step=1)
    train_grpo(_cfg(tiny_dir, cut, "steps=3"))
    a = {r["step"]: r for r in read_metrics(full)}
    b = {r["step"]: r for r in read_metrics(cut)}
    for step in (2, 3):
        for key in ("reward/total", "rollout/completion_len", "loss/policy", "loss/kl"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_group_size_one_refused():
    with pytest.raises(ConfigError, match="key 'group_size' must be >= 2"):
        _cfg("m", "o", "group_size=1")


def test_unknown_reward_refused():
    with pytest.raises(ConfigError, match=r"rewards\[0\].name': unknown reward 'exact_anser'"):
        load_config(GRPOConfig, None, ["model.path=m", "output_dir=o", "train_data=[a]",
                                       "rewards=[{name: exact_anser}]"])


def test_prompt_row_without_the_rewards_column_refused_before_work(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?"}])
    cfg = _cfg(tiny_dir, tmp_path / "out", f"train_data=[{data}]")
    with pytest.raises(ConfigError, match=r"reward 'exact_answer' needs column 'answer', which .*p.jsonl:row 2"):
        train_grpo(cfg)
    assert not (tmp_path / "out").exists()


def nan_reward(prompts, completions, **_):
    return [float("nan")] * len(completions)


def short_reward(prompts, completions, **_):
    return [0.0] * (len(completions) - 1)


@pytest.mark.parametrize("name,match", [("nan_reward", r"reward 'tests.test_grpo_loop:nan_reward' returned nan for "
                                                       r".*rl_prompts.jsonl:row \d+"),
                                        ("short_reward", r"reward 'tests.test_grpo_loop:short_reward' returned 7 "
                                                         r"scores for 8 completions")])
def test_bad_reward_stops_the_run_naming_it(tiny_dir, tmp_path, name, match):
    cfg = _cfg(tiny_dir, tmp_path / "out", f"rewards=[{{name: 'tests.test_grpo_loop:{name}'}}]")
    with pytest.raises(RewardError, match=match):
        train_grpo(cfg)


def fails_on_odd_numbers(prompts, completions, answer, **_):
    if any(int(a) % 2 for a in answer):
        raise ValueError("odd")
    return [0.0] * len(completions)


def test_skip_policy_keeps_training_and_counts_skipped_groups(tiny_dir, tmp_path):
    bad = "{name: 'tests.test_grpo_loop:fails_on_odd_numbers'}"
    cfg = _cfg(tiny_dir, tmp_path / "out", f"rewards=[{bad}, {{name: 'tests.test_grpo_loop:char_count'}}]",
               "on_reward_error=skip", "prompts_per_step=4", "steps=1")
    train_grpo(cfg)
    m = read_metrics(tmp_path / "out")[0]
    assert m["reward/skipped_groups"] >= 1


def dead_judge(prompts, completions, **_):
    raise ConnectionError("judge at http://127.0.0.1:9/v1 refused the connection")


def test_skip_policy_stops_a_run_whose_every_group_is_skipped(tiny_dir, tmp_path, capsys):
    cfg = _cfg(tiny_dir, tmp_path / "out", "rewards=[{name: 'tests.test_grpo_loop:dead_judge', label: judge}]",
               "on_reward_error=skip", "steps=5", "max_skipped_steps=2")
    with pytest.raises(RewardError, match=r"every prompt group of the last 2 steps was skipped .* reward 'judge': "
                                          r".*refused the connection"):
        train_grpo(cfg)
    assert "grpo: step 1: reward 'judge' failed, 2 of 2 prompt groups skipped" in capsys.readouterr().out
    assert not (tmp_path / "out" / "final").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [1]  # step 2 stopped before its row


@pytest.mark.parametrize("policy_loss", ["gspo", "cispo"])
def test_other_policy_losses_train(tiny_dir, tmp_path, policy_loss):
    train_grpo(_cfg(tiny_dir, tmp_path / "r", "steps=1", f"policy_loss={policy_loss}", "beta=0"))
    first = read_metrics(tmp_path / "r")[0]
    assert math.isfinite(first["loss/policy"]) and first["train/grad_norm"] > 0
    assert "loss/kl" not in first  # β = 0: nothing measured, nothing logged


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant"])
def test_the_loops_loss_is_grpo_loss_on_the_same_tensors(tiny_dir, aggregation):
    """The loop calls the tested loss as is: its micro-batch losses (2 micro-batches of one group each, with the
    global denominator) add up to `grpo_loss` over the whole batch."""
    from align.grpo.core import LossSettings, grpo_loss, tis_weights
    from align.model.policy import ModelConfig, load_policy

    torch.manual_seed(0)
    model = load_policy(ModelConfig(path=str(tiny_dir)))
    cfg = _cfg(tiny_dir, "unused", "beta=0", "micro_batch_size=4", f"aggregation={aggregation}")
    prompts = torch.randint(3, 1000, (2, 7)).repeat_interleave(4, 0)                 # 2 groups of G = 4
    ids = torch.cat([prompts, torch.randint(3, 1000, (8, 5))], 1)
    mask = torch.ones(8, 5)
    mask[1, 3:] = 0
    mask[6, 1:] = 0
    sampled = torch.full((8, 5), -7.0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -2.0, 0.0])
    with torch.no_grad():
        lp = forward_logprobs(model, ids, 5).logprobs
    want = grpo_loss(lp, lp, None, adv, mask,
                     LossSettings(beta=0.0, aggregation=aggregation, max_tokens=cfg.sampling.max_new_tokens),
                     weights=tis_weights(lp, sampled, cfg.tis_cap))
    stats = _update(_run(model, cfg), _traj(ids, mask, adv, G=4, sampling_logprobs=sampled), cfg,
                    PolicyForward.of(cfg), torch.Generator().manual_seed(0), 1)
    assert stats["loss/policy"] == pytest.approx(want.item(), rel=1e-5, abs=1e-7)


def test_normalize_mode_trains_and_logs_the_raw_weighted_sum(tiny_dir, tmp_path):
    train_grpo(_cfg(tiny_dir, tmp_path / "r", "steps=1", "reward_mode=normalize"))
    m = read_metrics(tmp_path / "r")[0]
    assert abs(m["reward/total"]) < 1e-5 and math.isfinite(m["reward/weighted"])  # Σ c_k z_k is group-centred
    assert "reward/partially_scored" not in m and m["train/grad_norm"] > 0
