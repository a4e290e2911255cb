"""Rollouts ahead of the policy (rollout.max_off_policy_steps, align/grpo/ahead.py) without a server: the producer's
bounds and metrics on a fake engine, the settings it refuses, the importance weight it relies on, and L = 0 being
the synchronous loop. Against a real vLLM server: tests/test_vllm_server.py."""

import math
import threading
import time

import pytest
import torch

from align.config import ConfigError, load_config
from align.grpo.ahead import RolloutsAhead
from align.grpo.config import GRPOConfig
from align.grpo.core import tis_weights
from align.rollout.protocol import SamplingConfig

from .conftest import DATA


class _Row:
    def __init__(self, step):
        self.messages = [{"role": "user", "content": f"step {step}"}]


class _SlowEngine:
    """Records when each generate ran and what the trainer's version was then."""

    def __init__(self, seconds=0.2, fail_at=None):
        self.seconds, self.fail_at, self.calls, self.lock = seconds, fail_at, [], threading.Lock()
        self.pause_for_sync = False

    def generate(self, prompts, n, sampling):
        step = int(prompts[0][0]["content"].split()[1])
        if step == self.fail_at:
            raise RuntimeError(f"server gone at step {step}")
        t0 = time.monotonic()
        time.sleep(self.seconds)
        with self.lock:
            self.calls.append((step, t0, time.monotonic()))
        return f"rollouts {step}"


@pytest.mark.parametrize("lag", [1, 2])
def test_the_producer_stays_within_lag_and_overlaps_training(lag):
    engine = _SlowEngine()
    ahead = RolloutsAhead(engine, lambda s: [_Row(s)], start=0, steps=6, lag=lag, n=2, sampling=SamplingConfig())
    assert engine.pause_for_sync
    trained = []
    for step in range(6):
        batch, m = ahead.take(step)
        assert batch.rollouts == f"rollouts {step}" and batch.step == step
        assert 0 <= m["rollout/staleness"] <= lag and step - batch.version == m["rollout/staleness"]
        t0 = time.monotonic()
        time.sleep(0.3)                                      # the update
        trained.append((t0, time.monotonic()))
        ahead.synced(step + 1)
    ahead.close()
    assert not engine.pause_for_sync
    starts = {s: t0 for s, t0, _ in engine.calls}
    for k in range(5):  # step k+1's generation started before step k's update ended
        assert starts[k + 1] < trained[k][1]
    for s, t0, _ in engine.calls:  # and never before the policy it is at most `lag` behind was pushed
        assert s - lag <= 0 or t0 >= trained[s - lag - 1][1]


def test_a_failing_producer_raises_on_the_trainers_thread():
    ahead = RolloutsAhead(_SlowEngine(0.01, fail_at=1), lambda s: [_Row(s)], 0, 4, 1, 2, SamplingConfig())
    ahead.take(0)
    ahead.synced(1)
    with pytest.raises(RuntimeError, match="server gone at step 1"):
        ahead.take(1)
    ahead.close()


def _cfg(tiny_dir, tmp_path, *extra):
    return load_config(GRPOConfig, None, [
        f"model.path={tiny_dir}", f"output_dir={tmp_path / 'r'}", f"train_data=[{DATA}/arith/rl_prompts.jsonl]",
        "rewards=[{name: exact_answer}]", *extra])


@pytest.mark.parametrize("extra, key", [
    (["rollout.max_off_policy_steps=1"], "rollout.max_off_policy_steps"),              # hf shares the process
    (["rollout.engine=vllm_server", "rollout.server.url=http://h:1", "rollout.max_off_policy_steps=1",
      "tis_cap=0"], "tis_cap"),
    (["sampling.top_p=0.9"], "sampling.top_p"),                                       # biased, synchronous too
    (["sampling.top_k=5"], "sampling.top_k"),                                         # the same for each
    (["sampling.min_p=0.05"], "sampling.min_p"),
    (["sampling.repetition_penalty=1.1"], "sampling.repetition_penalty"),
    (["rollout.engine=vllm_server", "rollout.server.url=http://h:1", "rollout.max_off_policy_steps=-1"],
     "rollout.max_off_policy_steps"),
])
def test_settings_rollouts_ahead_cannot_honour_are_refused_by_key(tiny_dir, tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(tiny_dir, tmp_path, *extra)
    ok = _cfg(tiny_dir, tmp_path, "rollout.engine=vllm_server", "rollout.server.url=http://h:1",
              "rollout.max_off_policy_steps=2")
    assert ok.rollout.max_off_policy_steps == 2


def test_truncated_importance_weights_make_an_off_policy_gradient_unbiased():
    """Toy categorical policy π = softmax(θ), samples from an older μ: with C = ∞ the weighted score-function
    estimate mean_i w_i A(x_i) ∇log π(x_i) matches the exact on-policy gradient Σ_x π(x) A(x) ∇log π(x) within 3
    standard errors; with μ = π every weight is 1."""
    gen = torch.Generator().manual_seed(0)
    K, N = 6, 200_000
    theta = torch.randn(K, generator=gen)
    mu_logits = theta + 0.5 * torch.randn(K, generator=gen)        # the sampler, some versions behind
    pi, mu = theta.softmax(0), mu_logits.softmax(0)
    A = torch.randn(K, generator=gen)                              # advantages per outcome
    score = torch.eye(K) - pi                                      # ∇_θ log π(x) = e_x − π, row x
    exact = (pi[:, None] * A[:, None] * score).sum(0)              # [K]
    x = torch.multinomial(mu, N, replacement=True, generator=gen)  # [N] drawn from μ
    w = tis_weights(pi.log()[x], mu.log()[x], cap=math.inf)        # [N]
    per = w[:, None] * A[x, None] * score[x]                       # [N, K]
    est, se = per.mean(0), per.std(0) / math.sqrt(N)
    assert ((est - exact).abs() <= 3 * se).all(), (est, exact, se)
    naive = (A[x, None] * score[x]).mean(0)                        # without the weights: biased
    assert ((naive - exact).abs() > 3 * se).any()
    assert torch.equal(tis_weights(pi.log()[x], pi.log()[x], cap=2.0), torch.ones(N))


def test_lag_zero_is_the_synchronous_loop(tiny_dir, tmp_path):
    """rollout.max_off_policy_steps=0 said explicitly gives the same metrics.jsonl as the default, timings aside."""
    from align.grpo.loop import train_grpo
    from align.run.metrics import read_metrics

    rows = []
    for name, extra in (("default", []), ("zero", ["rollout.max_off_policy_steps=0"])):
        cfg = load_config(GRPOConfig, None, [
            f"model.path={tiny_dir}", f"output_dir={tmp_path / name}", f"train_data=[{DATA}/arith/rl_prompts.jsonl]",
            "rewards=[{name: 'tests.test_grpo_loop:char_count', weight: 1.0}]", "group_size=3",
            "prompts_per_step=2", "steps=3", "sampling.max_new_tokens=6", "lr=1e-2", "save_every=0", *extra])
        train_grpo(cfg)
        rows.append([{k: v for k, v in m.items() if not k.startswith("perf/") and k != "time"}
                     for m in read_metrics(tmp_path / name)])
    assert len(rows[0]) == 3 and str(rows[0]) == str(rows[1])
