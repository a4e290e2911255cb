"""Chunked log-probs equal the unchunked ones (values and gradients); the model path agrees with its logits."""

import pytest
import torch

from align.model.logprobs import chunked_token_logprobs, forward_logprobs, token_logprobs_reference


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_unchunked(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 11))
    ref = token_logprobs_reference(hidden @ weight.T, targets)
    got, ent = chunked_token_logprobs(hidden, weight, targets, chunk_tokens=chunk, with_entropy=True)
    assert torch.allclose(got, ref, atol=1e-5)
    p = torch.softmax(hidden @ weight.T, -1)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-4)
    g_ref = torch.autograd.grad(ref.sum(), (hidden, weight))
    g_got = torch.autograd.grad(got.sum(), (hidden, weight))
    for a, b in zip(g_ref, g_got):
        assert torch.allclose(a, b, atol=1e-5)


def test_temperature_scales_logits():
    hidden, weight = torch.randn(2, 4, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (2, 4))
    got, _ = chunked_token_logprobs(hidden, weight, targets, chunk_tokens=3, temperature=0.7)
    assert torch.allclose(got, token_logprobs_reference(hidden @ weight.T / 0.7, targets), atol=1e-5)


def test_large_vocab_chunks_bound_the_logits():
    # a 102,400-token vocabulary: 256 tokens chunked by 32 never hold more than 32 x 102,400 logits at once
    hidden, weight = torch.randn(1, 256, 8), torch.randn(102_400, 8) * 0.1
    targets = torch.randint(0, 102_400, (1, 256))
    got, _ = chunked_token_logprobs(hidden, weight, targets, chunk_tokens=32)
    assert torch.allclose(got, token_logprobs_reference(hidden @ weight.T, targets), atol=1e-4)


def test_forward_logprobs_matches_model_logits(tiny_dir):
    from align.model.policy import ModelConfig, load_policy

    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    out = forward_logprobs(model, ids, 6, attention_mask=mask, chunk_tokens=5, router_logits=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out.logprobs, token_logprobs_reference(logits[:, -7:-1], ids[:, -6:]), atol=1e-5)
    assert len(out.router_logits) == 2  # two MoE layers (the first layer is dense)


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_forward_equals_whole_rows(tiny_dir, lora):
    """GRPO rows (groups of G sharing a left-padded prompt): running each prompt once gives the same log-probs,
    entropies, gradients and expert statistics as running every row whole, and falls back when prompts differ."""
    from align.model.moe import expert_balance_loss, expert_load, routing_kwargs
    from align.model.policy import LoRAConfig, ModelConfig, load_policy

    torch.manual_seed(0)
    model = load_policy(ModelConfig(path=str(tiny_dir), lora=LoRAConfig(enabled=lora)))
    G, B, P, C = 3, 2, 7, 5
    prompt = torch.randint(3, 1000, (B, P))
    pmask = torch.ones(B, P, dtype=torch.long)
    pmask[1, :3] = 0                                                               # left padding
    comp = torch.randint(3, 1000, (B * G, C))
    cmask = torch.ones(B * G, C, dtype=torch.long)
    cmask[4, 3:] = 0                                                               # a short completion
    ids = torch.cat([prompt.repeat_interleave(G, 0), comp], 1)
    mask = torch.cat([pmask.repeat_interleave(G, 0), cmask], 1)
    routing = routing_kwargs(model.config)
    k = model.config.num_experts_per_tok

    def run(group_size):
        out = forward_logprobs(model, ids, C, mask, chunk_tokens=4, with_entropy=True, router_logits=True,
                               group_size=group_size)
        rmask = out.router_mask if out.router_mask is not None else mask.reshape(-1)
        m = cmask.float()
        (out.logprobs * m).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        balance = expert_balance_loss(out.router_logits, k, 0.1, rmask, **routing).item()
        return out, grads, {**expert_load(out.router_logits, k, rmask, **routing), "balance": balance}

    rows = []  # tokens through each layer's kv_b_proj (the MLA up-projection)
    hooks = [m.register_forward_hook(lambda mod, i, o: rows.append(i[0].shape[:-1].numel()))
             for n, m in model.named_modules() if n.endswith("kv_b_proj")]
    whole, g_whole, load_whole = run(1)
    whole_rows, rows[:] = sum(rows), []
    shared, g_shared, load_shared = run(G)
    for h in hooks:
        h.remove()
    assert shared.router_mask is not None and whole.router_mask is None           # the shared path ran
    layers = model.config.num_hidden_layers
    assert whole_rows == layers * B * G * (P + C)
    assert sum(rows) == layers * (B * P + B * G * C)                               # the prompt up-projected once
    m = cmask.bool()
    assert torch.allclose(shared.logprobs[m], whole.logprobs[m], atol=1e-5)
    assert torch.allclose(shared.entropy[m], whole.entropy[m], atol=1e-5)
    assert g_shared.keys() == g_whole.keys() and len(g_whole) > 5
    for n in g_whole:
        assert torch.allclose(g_shared[n], g_whole[n], atol=1e-5, rtol=1e-4), n
    # expert statistics count each prompt token once instead of G times: close, not equal
    assert load_shared["moe/load_max"] == pytest.approx(load_whole["moe/load_max"], rel=0.5)
    assert load_shared["balance"] == pytest.approx(load_whole["balance"], rel=0.5)
    ids[1, 0] = ids[0, 0] + 1                                                      # group 0's prompts now differ
    assert forward_logprobs(model, ids, C, mask, group_size=G).router_mask is None  # whole rows again
