"""GRPO on the tiny model: identities at the first step, the direction of one update, resume, bad input."""

import math

import pytest
import torch

from align.config import ConfigError, load_config
from align.grpo.config import GRPOConfig
from align.grpo.loop import _update, train_grpo
from align.logprobs import forward_logprobs
from align.metrics import read_metrics
from rewards import RewardError

from .conftest import DATA, interrupted_copy, write_jsonl


def char_count(prompts, completions, **_):
    """A reward with spread even for a random-weight model."""
    return [float(len(c)) for c in completions]


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
    assert first["loss/kl"] == 0.0
    assert first["policy/ratio"] == 1.0
    assert first["loss/clip_frac"] == 0.0
    assert first["rollout/logprob_gap"] < 1e-3  # HF sampling log-probs agree with the trainer's (fp32)


def test_multiple_inner_epochs_use_precomputed_old_logprobs(tiny_dir, tmp_path):
    train_grpo(_cfg(tiny_dir, tmp_path / "r", "steps=1", "inner_epochs=2", "minibatches=2", "beta=0"))
    m = read_metrics(tmp_path / "r")[0]
    assert m["policy/ratio"] != 1.0  # later minibatches see a moved policy against fixed old log-probs
    assert abs(m["policy/ratio"] - 1.0) < 0.5


def test_one_update_moves_logprobs_in_the_advantage_direction(tiny_dir):
    from accelerate import Accelerator

    from align.optim import build_optimizer, warmup_cosine
    from align.policy import ModelConfig, load_policy

    torch.manual_seed(0)
    model = load_policy(ModelConfig(path=str(tiny_dir)))
    cfg = _cfg(tiny_dir, "unused", "beta=0", "micro_batch_size=8")
    ids = torch.randint(3, 1000, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones(2, 5),
             "sampling_logprobs": torch.zeros(2, 5),
             "advantages": torch.tensor([1.0, -1.0]), "n": 5, "old_logprobs": None, "ref_logprobs": None}
    before = forward_logprobs(model, ids, 5).logprobs.sum(1).detach()
    opt = build_optimizer(model, 1e-3, 0.0)
    _update(model, opt, warmup_cosine(opt, 1, 0, 1.0), Accelerator(cpu=True), batch, cfg, None,
            torch.Generator().manual_seed(0))
    after = forward_logprobs(model, ids, 5).logprobs.sum(1).detach()
    assert after[0] > before[0]  # positive advantage: more likely
    assert after[1] < before[1]  # negative advantage: less likely


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
    from accelerate import Accelerator

    from align.grpo.core import grpo_loss, tis_weights
    from align.optim import build_optimizer, warmup_cosine
    from align.policy import ModelConfig, load_policy

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
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask, "sampling_logprobs": sampled,
             "advantages": adv, "n": 5, "old_logprobs": None, "ref_logprobs": None}
    with torch.no_grad():
        lp = forward_logprobs(model, ids, 5).logprobs
    want = grpo_loss(lp, lp, None, adv, mask, beta=0.0, aggregation=aggregation,
                     max_tokens=cfg.sampling.max_new_tokens, weights=tis_weights(lp, sampled, cfg.tis_cap))
    opt = build_optimizer(model, 1e-3, 0.0)
    stats, _ = _update(model, opt, warmup_cosine(opt, 1, 0, 1.0), Accelerator(cpu=True), batch, cfg, None,
                       torch.Generator().manual_seed(0))
    assert stats["loss/policy"] == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
