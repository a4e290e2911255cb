"""The HF rollout engine: layout, completion masks, truncation flags, sampling log-probs."""

import torch

from align.grpo.reference import Reference
from align.model.logprobs import forward_logprobs
from align.model.policy import ModelConfig, load_policy
from align.rollout.hf import HFEngine, completion_mask_from_stops
from align.rollout.protocol import SamplingConfig

PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Hi, how do I make tea?"}]]


def test_completion_mask_hand_computed():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])  # 2 = stop, 0 = pad
    mask, truncated = completion_mask_from_stops(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_generate_layout_and_logprobs_match_the_trainer(tiny_dir, tokenizer):
    torch.manual_seed(0)
    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    out = HFEngine(model, tokenizer).generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=6))
    n, c = out.completion_ids.shape
    assert n == 6 and out.group_size == 3 and out.num_prompts == 2 and c <= 6
    assert torch.equal(out.prompt_ids[0], out.prompt_ids[2]) and out.prompt_mask[0, 0] == 0  # repeated, left-padded
    assert len(out.completions) == 6 and out.truncated.dtype == torch.bool
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
    trainer = forward_logprobs(model, ids, c, mask).logprobs
    m = out.completion_mask.bool()
    assert torch.allclose(trainer[m], out.sampling_logprobs[m], atol=1e-4)
    assert (out.sampling_logprobs[~m] == 0).all()


def test_greedy_is_deterministic_and_stops_at_eos(tiny_dir, tokenizer):
    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    engine = HFEngine(model, tokenizer)
    a = engine.generate(PROMPTS, n=1, sampling=SamplingConfig(temperature=0, max_new_tokens=5))
    b = engine.generate(PROMPTS, n=1, sampling=SamplingConfig(temperature=0, max_new_tokens=5))
    assert torch.equal(a.completion_ids, b.completion_ids)
    for ids, m, t in zip(a.completion_ids, a.completion_mask, a.truncated):
        kept = ids[m.bool()].tolist()
        assert t or kept[-1] == tokenizer.eos_token_id


def test_select_keeps_rows():
    from align.rollout.protocol import Rollouts

    z = torch.zeros(4, 3, dtype=torch.long)
    r = Rollouts(z, z, z + torch.arange(4).unsqueeze(1), z, z.float(), torch.zeros(4, dtype=torch.bool),
                 ["a", "b", "c", "d"], 2)
    s = r.select(torch.tensor([2, 3]))
    assert s.completions == ["c", "d"] and s.completion_ids[:, 0].tolist() == [2, 3] and s.num_prompts == 1


def test_beta_zero_loads_no_reference(tiny_dir):
    ref = Reference(ModelConfig(path=str(tiny_dir)), beta=0.0, device="cpu")
    assert ref.model is None and ref.logprobs(None, None, None) == (None, None)
    full = Reference(ModelConfig(path=str(tiny_dir)), beta=0.04, device="cpu")
    assert full.model is not None and not any(p.requires_grad for p in full.model.parameters())


def test_stop_string_ends_the_completion_and_masks_what_follows(tiny_dir, tokenizer):
    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    engine = HFEngine(model, tokenizer)
    free = engine.generate(PROMPTS, n=1, sampling=SamplingConfig(temperature=0, max_new_tokens=12))
    row = max(range(len(PROMPTS)), key=lambda i: len(free.completions[i]))
    text = free.completions[row]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    out = engine.generate(PROMPTS, n=1, sampling=SamplingConfig(temperature=0, max_new_tokens=12, stop=[stop]))
    kept = out.completion_mask[row].sum().item()
    assert stop in out.completions[row]  # ... and the token that completed it is the last one kept
    assert stop not in tokenizer.decode(out.completion_ids[row, :kept - 1], skip_special_tokens=True)
    assert kept < free.completion_mask[row].sum().item() and not out.truncated[row]
    assert (out.completion_mask[row, kept:] == 0).all() and (out.sampling_logprobs[row, kept:] == 0).all()
    assert out.completion_ids[row, :kept].tolist() == free.completion_ids[row, :kept].tolist()


def test_sampling_logprobs_are_of_the_distribution_sampled_from(tiny_dir, tokenizer):
    """Temperature: log softmax(logits / T), as the trainer computes them. top_p < 1: the nucleus renormalised, so
    never below the full distribution's log-prob (both as vLLM reports them)."""
    torch.manual_seed(0)
    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    engine = HFEngine(model, tokenizer)

    def trainer(out, temperature):
        ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
        mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
        return forward_logprobs(model, ids, out.completion_ids.shape[1], mask, temperature=temperature).logprobs

    hot = engine.generate(PROMPTS, n=2, sampling=SamplingConfig(temperature=0.7, max_new_tokens=6))
    m = hot.completion_mask.bool()
    assert torch.allclose(trainer(hot, 0.7)[m], hot.sampling_logprobs[m], atol=1e-4)
    nucleus = engine.generate(PROMPTS, n=2, sampling=SamplingConfig(temperature=1.0, top_p=0.3, max_new_tokens=6))
    m = nucleus.completion_mask.bool()
    gap = nucleus.sampling_logprobs[m] - trainer(nucleus, 1.0)[m]
    assert (gap > -1e-4).all() and (gap > 1e-3).any()


def test_sample_from_draws_each_token_with_its_probability():
    from align.rollout.hf import sample_from

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25], [2.0, 0.0, 0.0, 0.0, 6.0]])  # rows need not sum to 1
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_from(probs, gen) for _ in range(20000)], 1)             # [2, 20000]
    freq = torch.stack([torch.bincount(row, minlength=5) for row in draws]).float() / draws.shape[1]
    expected = probs / probs.sum(1, keepdim=True)
    assert (freq[expected == 0] == 0).all()                                            # never a zero-prob token
    assert torch.allclose(freq, expected, atol=0.015)                                  # ~4 sigma at n = 20000


def test_sample_from_never_draws_past_the_last_positive_token():
    from align.rollout.hf import sample_from

    probs = torch.zeros(4096, 6)
    probs[:, 2] = 1.0                                                                 # all mass on one token
    assert (sample_from(probs) == 2).all()


def test_reserved_cache_generates_what_a_growing_cache_generates(tiny_dir, tokenizer):
    """The preallocated cache is a drop-in for transformers' DynamicCache: same greedy tokens and scores, also
    after a batch repeat (the shared prefill's path)."""
    from transformers.cache_utils import DynamicCache

    from align.rollout.hf import ReservedCache

    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False).eval()
    enc = tokenizer(["What is 3 + 4?", "Hi"], padding=True, return_tensors="pt")
    outs = []
    for cache in (DynamicCache(), ReservedCache(room=2)):  # room 2 < 6 new tokens: the room is regrown
        gen = model.generate(**enc, max_new_tokens=6, do_sample=False, past_key_values=cache, top_k=None,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        outs.append((gen.sequences, torch.stack(gen.scores)))
        cache.batch_repeat_interleave(2)
        k, v = cache.layers[0].keys, cache.layers[0].values                              # [4, 1, T, d]
        cache.update(torch.ones(*k.shape[:2], 1, k.shape[-1]), torch.ones(*v.shape[:2], 1, v.shape[-1]), 0)
        outs.append((cache.layers[0].keys, cache.layers[0].values))
    assert torch.equal(outs[0][0], outs[2][0]) and torch.allclose(outs[0][1], outs[2][1], atol=1e-5)
    assert torch.equal(outs[1][0], outs[3][0]) and torch.equal(outs[1][1], outs[3][1])


def test_top_k_min_p_and_repetition_penalty(tiny_dir, tokenizer):
    """top_k=1 and min_p close to 1 keep only the most likely token: the greedy completion, each sampled token
    at log-prob 0 (the kept set renormalised). A repetition penalty changes greedy decoding and its log-probs are of
    the penalised distribution (as vLLM's processed_logprobs)."""
    from align.rollout.hf import processors
    from align.rollout.protocol import vllm_sampling

    torch.manual_seed(0)
    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    engine = HFEngine(model, tokenizer)
    greedy = engine.generate(PROMPTS, n=1, sampling=SamplingConfig(temperature=0, max_new_tokens=8))
    for kept in (SamplingConfig(temperature=1.0, top_k=1, max_new_tokens=8),
                 SamplingConfig(temperature=1.0, min_p=0.999, max_new_tokens=8)):
        out = engine.generate(PROMPTS, n=2, sampling=kept)
        assert torch.equal(out.completion_ids, greedy.completion_ids.repeat_interleave(2, 0))
        assert out.sampling_logprobs.abs().max() < 1e-6
    penalised = engine.generate(PROMPTS, n=1, sampling=SamplingConfig(temperature=0, repetition_penalty=50.0,
                                                                     max_new_tokens=8))
    assert not torch.equal(penalised.completion_ids, greedy.completion_ids)
    for row in penalised.completion_ids[penalised.completion_mask.bool().all(1)]:  # a huge penalty: no repeats
        assert len(set(row.tolist())) == len(row)
    names = [type(p).__name__ for p in processors(SamplingConfig(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1,
                                                                 repetition_penalty=1.2), torch.ones(1, 2))]
    assert names == ["RepetitionPenalty", "TemperatureLogitsWarper", "TopKLogitsWarper",
                     "TopPLogitsWarper", "MinPLogitsWarper"]                      # vLLM's order
    assert vllm_sampling(SamplingConfig(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, repetition_penalty=1.2)) == \
        {"top_p": 0.9, "top_k": 3, "min_p": 0.1, "repetition_penalty": 1.2}
    assert vllm_sampling(SamplingConfig(temperature=0, top_k=3, top_p=0.9, min_p=0.1)) == \
        {"top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
    # hand-checked: seen tokens 1 (prompt) and 2 (completion); token 3 sits in the padding; 2.0 / 2, -1.0 * 2
    penalty = processors(SamplingConfig(temperature=0, repetition_penalty=2.0), torch.tensor([[0, 1]]))[0]
    scores = torch.tensor([[0.5, 3.0, -1.0, 4.0]])
    assert torch.equal(penalty(torch.tensor([[3, 1, 2]]), scores), torch.tensor([[0.5, 1.5, -2.0, 4.0]]))


def test_sampling_settings_are_checked_by_key():
    import pytest

    from align.config import ConfigError

    for key, value in (("top_k", -1), ("min_p", 1.0), ("repetition_penalty", 0.0)):
        with pytest.raises(ConfigError, match=rf"sampling\.{key}"):
            SamplingConfig(**{key: value}).validate()
