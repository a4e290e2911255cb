"""Expert-level balance loss against a hand-computed value; routing against transformers' router."""

import pytest
import torch

from align.model.moe import expert_balance_loss, expert_load, select_experts


def test_balance_loss_hand_computed():
    # 2 tokens, 4 experts, top-2. Logits chosen so softmax scores are exact:
    # token 0 scores [0.4, 0.3, 0.2, 0.1] -> selects {0, 1}; token 1 scores [0.1, 0.2, 0.3, 0.4] -> selects {3, 2}
    s0 = torch.tensor([0.4, 0.3, 0.2, 0.1])
    s1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = torch.stack([s0.log(), s1.log()])
    # f_i = N_r/(K_r T) * count_i = 4/(2*2) * 1 = 1 for every expert; P = mean scores = [0.25]*4
    # L = α * Σ f_i P_i = α * 1.0
    assert expert_balance_loss([logits], top_k=2, alpha=0.003).item() == pytest.approx(0.003)
    # unbalanced: both tokens pick {0, 1}: f = [2, 2, 0, 0], P = [0.4, 0.3, 0.2, 0.1] -> Σ f P = 1.4
    both = torch.stack([s0.log(), s0.log()])
    assert expert_balance_loss([both], top_k=2, alpha=1.0).item() == pytest.approx(1.4)
    # two layers add up; padding tokens are left out
    assert expert_balance_loss([both, logits], top_k=2, alpha=1.0).item() == pytest.approx(2.4)
    padded = torch.stack([s0.log(), s0.log(), s1.log()])
    assert expert_balance_loss([padded], 2, 1.0, token_mask=torch.tensor([1, 1, 0])).item() == pytest.approx(1.4)


def test_balance_loss_has_gradient_through_scores():
    logits = torch.randn(16, 8, requires_grad=True)
    expert_balance_loss([logits], top_k=2, alpha=1.0).backward()
    assert logits.grad.abs().sum() > 0


def test_expert_load_metrics():
    s0 = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    m = expert_load([torch.stack([s0, s0])], top_k=2)
    assert m["moe/load_max"] == pytest.approx(2.0) and m["moe/load_min"] == pytest.approx(0.0)


@pytest.mark.parametrize("method,n_group,topk_group", [("greedy", 1, 1), ("group_limited_greedy", 4, 2)])
def test_selection_matches_transformers_router(method, n_group, topk_group):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    from align.model.presets import preset_config

    cfg = preset_config("tiny", topk_method=method, n_group=n_group, topk_group=topk_group)
    router = DeepseekV2TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    hidden = torch.randn(32, cfg.hidden_size)
    logits, _, idx = router(hidden)
    ours = select_experts(torch.softmax(logits, -1), cfg.num_experts_per_tok, method, n_group, topk_group)
    assert torch.equal(ours.sort(-1).values, idx.sort(-1).values)


def test_measure_experts_impl_times_every_kernel_and_caches(tiny_dir, tmp_path):
    import json

    from align.model.moe import EXPERTS_KERNELS, measure_experts_impl
    from align.model.policy import ModelConfig, load_policy

    model = load_policy(ModelConfig(path=str(tiny_dir)))
    cache = tmp_path / "kernels.json"
    best = measure_experts_impl(model, tokens=64, repeats=1, cache=str(cache))
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert best in EXPERTS_KERNELS and entry["best"] == best
    assert set(entry["seconds"]) == set(EXPERTS_KERNELS)
    assert min(entry["seconds"], key=entry["seconds"].get) == best
    assert measure_experts_impl(model, tokens=64, repeats=1, cache=str(cache)) == best  # from the cache
    assert all(p.grad is None for p in model.parameters())


def test_decode_keeps_the_experts_kernel_for_large_batches(tiny_dir):
    """transformers switches grouped_mm to batched_mm for decode steps on an accelerator; batched_mm gathers a weight
    copy per (token, expert) pair, so for many rows align keeps the measured kernel (tested here by calling the
    switch as generate does: on CPU transformers never switches, so the device check is patched)."""
    from unittest import mock

    from align.model.moe import batched_decode_wins, decode_experts_kernel
    from align.model.policy import ModelConfig, load_policy

    model = load_policy(ModelConfig(path=str(tiny_dir)))
    cfg = model.config
    assert batched_decode_wins(cfg.n_routed_experts // cfg.num_experts_per_tok, cfg)
    assert not batched_decode_wins(cfg.n_routed_experts // cfg.num_experts_per_tok + 1, cfg)
    model.set_experts_implementation("grouped_mm")

    def decode_kernel(rows):
        with mock.patch.object(type(model), "device", new=torch.device("cuda")), \
                decode_experts_kernel(model, rows), model._optimize_model_for_decode():
            return model.get_experts_implementation()

    assert set(decode_kernel(1).values()) == {"batched_mm"}     # transformers' switch, where it pays
    assert set(decode_kernel(256).values()) == {"grouped_mm"}   # kept: 256 x k copies would exceed E experts
    assert "_optimize_model_for_decode" not in vars(model)      # the class's method is back
    assert set(model.get_experts_implementation().values()) == {"grouped_mm"}
