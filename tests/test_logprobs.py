"""Chunked log-probs equal the unchunked ones (values and gradients); the model path agrees with its logits."""

import pytest
import torch

from align.logprobs import chunked_token_logprobs, forward_logprobs, token_logprobs_reference


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
    from align.policy import ModelConfig, load_policy

    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    out = forward_logprobs(model, ids, 6, attention_mask=mask, chunk_tokens=5, router_logits=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out.logprobs, token_logprobs_reference(logits[:, -7:-1], ids[:, -6:]), atol=1e-5)
    assert len(out.router_logits) == 2  # two MoE layers (the first layer is dense)
