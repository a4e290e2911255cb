"""MoE routing replay (R2 old-policy routes, R3 sampler routes), router freezing, routing metrics."""

import warnings

import pytest
import torch

from align.model import fastpaths
from align.config import ConfigError, load_config
from align.grpo.config import GRPOConfig
from align.grpo.loop import _update, train_grpo
from align.grpo.trajectory import PolicyForward
from align.model.logprobs import forward_logprobs
from align.run.metrics import read_metrics
from align.model.policy import ModelConfig, load_policy
from align.model.routing import agreement, gates

from .conftest import DATA
from .test_grpo_loop import _run, _traj


def _cfg(model, out, *extra):
    return load_config(GRPOConfig, None, [
        f"model.path={model}", f"output_dir={out}", f"train_data=[{DATA}/arith/rl_prompts.jsonl]",
        "rewards=[{name: exact_answer}]", "group_size=4", "prompts_per_step=2", "steps=1",
        "sampling.max_new_tokens=8", "lr=1e-3", "save_every=0", "tensorboard=false", *extra])


def _groups():
    torch.manual_seed(0)
    prompts = torch.randint(3, 1000, (2, 7)).repeat_interleave(4, 0)                 # 2 groups of G = 4
    return torch.cat([prompts, torch.randint(3, 1000, (8, 5))], 1)


@pytest.fixture
def rerouting():
    """Makes every gate of a model choose other experts than its scores say (what re-routing between the old
    and the update forward does), until the test ends."""
    handles = []

    def apply(model):
        for g in gates(model):
            handles.append(g.register_forward_hook(lambda m, a, out: (out[0], out[1], (out[2] + 1) % m.num_experts)))
    yield apply
    for h in handles:
        h.remove()


def test_old_routes_replayed_exactly_in_the_update_forward(tiny_dir, rerouting):
    model = load_policy(ModelConfig(path=str(tiny_dir)))
    cfg = _cfg(tiny_dir, "unused", "micro_batch_size=4", "beta=0", "inner_epochs=2", "routing_replay=old")
    ids = _groups()
    traj = _traj(ids, torch.ones(8, 5), torch.randn(8), G=4)
    forward = PolicyForward.of(cfg)
    traj.old_logprobs, traj.routes = forward.no_grad(model, traj, record_routes=True)
    rerouting(model)                                    # from here on the router would pick other experts
    moved = forward(model, traj[torch.arange(8)], record_routes=True)
    assert (moved.routes == traj.routes).all()          # the update forward used exactly the recorded routes
    assert (moved.logprobs - traj.old_logprobs).abs().max() < 1e-6
    fresh = forward_logprobs(model, ids, 5, torch.ones_like(ids), group_size=4)
    assert (fresh.logprobs - traj.old_logprobs).abs().max() > 1e-3   # without replay: ρ compares another network
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = _update(_run(model, cfg, frozen), traj, cfg, forward, torch.Generator().manual_seed(0), 1)
    assert stats["policy/ratio"] == pytest.approx(1.0, abs=1e-6) and stats["loss/clip_frac"] == 0.0


def test_gradient_reaches_the_router_through_replayed_weights(tiny_dir):
    model = load_policy(ModelConfig(path=str(tiny_dir)))
    ids = _groups()
    routes = forward_logprobs(model, ids, 5, torch.ones_like(ids), record_routes=True).routes
    forward_logprobs(model, ids, 5, torch.ones_like(ids), routes=routes).logprobs.sum().backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in gates(model))


def test_sampler_routes_bring_the_trainer_closer_to_the_sampling_logprobs(tiny_dir, tokenizer):
    """bf16: the trainer's full forward re-routes some tokens the decode loop routed otherwise; replaying the
    engine's routes (R3) makes every route agree and the log-prob gap smaller."""
    from align.rollout.hf import HFEngine
    from align.rollout.protocol import SamplingConfig

    model = load_policy(ModelConfig(path=str(tiny_dir), dtype="bfloat16"), trainable=False)
    torch.manual_seed(0)
    prompts = [[{"role": "user", "content": f"What is {a} + {a + 3}?"}] for a in range(8)]
    r = HFEngine(model, tokenizer, record_routes=True).generate(prompts, 4, SamplingConfig(max_new_tokens=16))
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    C, P = r.completion_ids.shape[1], r.prompt_ids.shape[1]
    where = torch.zeros(ids.shape)
    where[:, P - 1:-1] = r.completion_mask
    m = r.completion_mask.bool()
    gap, agree = {}, {}
    for name, routes in (("none", None), ("rollout", r.routes)):
        out = forward_logprobs(model, ids, C, mask, group_size=4, routes=routes, record_routes=True)
        gap[name] = (out.logprobs - r.sampling_logprobs)[m].abs().mean().item()
        agree[name] = agreement(out.routes, r.routes, where)
    print(f"bf16 |log-prob gap| to the sampler: {gap}; route agreement: {agree}")
    assert agree["rollout"] == 1.0 and agree["none"] < 1.0
    assert gap["rollout"] < gap["none"]


def test_grpo_with_rollout_replay_and_frozen_router(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    before = {n: p.detach().clone() for n, p in load_policy(ModelConfig(path=str(tiny_dir))).named_parameters()}
    train_grpo(_cfg(tiny_dir, tmp_path / "r", "inner_epochs=2", "routing_replay=rollout", "freeze_router=true",
                    "routing_metrics_every=1", "rewards=[{name: 'tests.test_grpo_loop:char_count'}]"))
    m = read_metrics(tmp_path / "r")[-1]
    assert {"routing/update_agreement", "routing/ref_agreement", "routing/sampler_agreement"} <= set(m)
    after = load_file(str(tmp_path / "r" / "final" / "model.safetensors"))
    gate_names = [n for n in before if n.endswith("mlp.gate.weight")]
    assert gate_names and all(torch.equal(after[n], before[n]) for n in gate_names)
    assert any(not torch.equal(after[n], before[n]) for n in before if n.endswith("o_proj.weight"))


def test_routing_keys_refused_for_a_dense_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(dense)
    for key in ("routing_replay=old", "freeze_router=true"):
        with pytest.raises(ConfigError, match=f"key '{key.split('=')[0]}'.*not a DeepSeek-V2 MoE"):
            train_grpo(_cfg(dense, tmp_path / "o", key))
        assert not (tmp_path / "o").exists()


def test_routing_falls_back_with_one_warning_when_the_gate_changed(tiny_dir, tmp_path, monkeypatch):
    import align.model.routing

    monkeypatch.setattr(align.model.routing, "gates", lambda model: [])   # as if transformers renamed its gate
    fastpaths.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_grpo(_cfg(tiny_dir, tmp_path / "r", "inner_epochs=2", "routing_replay=old"))
        ours = [w for w in caught if "MoE route recording and replay is off" in str(w.message)]
        assert len(ours) == 1 and "routing_replay acts as none" in str(ours[0].message)
        assert not any(k.startswith("routing/") for k in read_metrics(tmp_path / "r")[-1])
    finally:
        fastpaths.reset()
