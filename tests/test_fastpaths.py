"""The fast paths into transformers internals (align/model/fastpaths.py): active on the installed version; where a
(simulated) new transformers changes what they rely on, they stand aside with one warning and the numbers are
transformers' own."""

import warnings

import pytest
import torch
import transformers
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as dsv2

from align.model import fastpaths
from align.model.logprobs import forward_logprobs
from align.model.policy import ModelConfig, load_policy
from align.rollout.hf import HFEngine
from align.rollout.protocol import SamplingConfig

PROMPTS = [[{"role": "user", "content": q}] for q in ("What is 12 + 34?", "hello")]


@pytest.fixture
def fresh_checks():
    fastpaths.reset()
    yield
    fastpaths.reset()


@pytest.mark.parametrize("name", sorted(fastpaths.PROBES))
def test_fast_path_is_active_on_the_installed_transformers(name, fresh_checks):
    s = fastpaths.status(name)
    assert s.active, f"{name} stands aside on transformers {transformers.__version__}: {s.reason}"


def test_cache_keyword_follows_the_installed_version():
    from packaging.version import Version

    new = Version(transformers.__version__) >= Version("5.24.0")
    assert fastpaths.CACHE_KW == ("cache" if new else "past_key_values")


def test_probe_leaves_the_callers_random_state_alone(fresh_checks):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for name in fastpaths.PROBES:
        fastpaths.status(name)
    assert torch.equal(torch.get_rng_state(), before)


def _without_cache_parameter(monkeypatch):
    """A transformers whose attention takes its cache through **kwargs (the parameter align binds is gone)."""
    original = dsv2.DeepseekV2Attention.forward

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        return original(self, hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                        **kwargs)

    monkeypatch.setattr(dsv2.DeepseekV2Attention, "forward", forward)


def _reference_logprobs(model, r):
    """transformers' own forward (no fast path) on the generated tokens."""
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    with torch.no_grad():
        return forward_logprobs(model, ids, r.completion_ids.shape[1], mask).logprobs * r.completion_mask


def test_changed_attention_signature_falls_back_with_one_warning(tiny_dir, tokenizer, monkeypatch, fresh_checks):
    _without_cache_parameter(monkeypatch)
    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    engine = HFEngine(model, tokenizer)
    sampling = SamplingConfig(temperature=0, max_new_tokens=8)
    with pytest.warns(RuntimeWarning, match=rf"absorbed-MLA decode is off on transformers {transformers.__version__}"):
        r = engine.generate(PROMPTS, n=1, sampling=sampling)
    assert not fastpaths.status("absorbed_mla").active
    assert "cache" in fastpaths.status("absorbed_mla").reason or "past_key_values" in fastpaths.status(
        "absorbed_mla").reason
    assert (r.sampling_logprobs - _reference_logprobs(model, r)).abs().max() < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # the warning comes once per process, not per call
        engine.generate(PROMPTS, n=1, sampling=sampling)


def test_changed_expand_kv_falls_back_to_whole_rows(tiny_dir, monkeypatch, fresh_checks):
    original = dsv2.DeepseekV2Attention.expand_kv
    monkeypatch.setattr(dsv2.DeepseekV2Attention, "expand_kv", lambda self, latent, rope: original(self, latent, rope))
    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    prompt = torch.randint(3, 1000, (2, 6)).repeat_interleave(4, 0)                   # 2 prompts x G=4
    ids = torch.cat([prompt, torch.randint(3, 1000, (8, 5))], 1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        whole = forward_logprobs(model, ids, 5, mask, group_size=1).logprobs
        with pytest.warns(RuntimeWarning, match="shared-prompt MLA forward is off"):
            grouped = forward_logprobs(model, ids, 5, mask, group_size=4).logprobs
    assert torch.equal(grouped, whole)                                              # the same path, row by row


def test_probe_catches_silently_different_numbers(tiny_dir, tokenizer, monkeypatch, fresh_checks):
    """A layout change that still runs but computes something else (here: the absorbed weights read wrong) is caught
    by the probe, and generation keeps transformers' numbers."""
    from align.model import mla

    original = mla._effective_weight
    monkeypatch.setattr(mla, "_effective_weight", lambda linear: 1.5 * original(linear))
    with pytest.warns(RuntimeWarning, match="differs from transformers' own path"):
        assert not fastpaths.active("absorbed_mla")
    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    r = HFEngine(model, tokenizer).generate(PROMPTS, n=1, sampling=SamplingConfig(temperature=0, max_new_tokens=8))
    assert (r.sampling_logprobs - _reference_logprobs(model, r)).abs().max() < 1e-5


def test_changed_cache_layer_protocol_falls_back_to_generates_own_cache(tiny_dir, tokenizer, monkeypatch,
                                                                          fresh_checks):
    from align.rollout import hf

    def broken_update(self, key_states, value_states, *args, **kwargs):  # e.g. a new required bookkeeping step
        raise AttributeError("'ReservedLayer' object has no attribute 'cumulative_length'")

    monkeypatch.setattr(hf.ReservedLayer, "update", broken_update)
    model = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    with pytest.warns(RuntimeWarning, match="reserved KV cache and shared prefill is off"):
        r = HFEngine(model, tokenizer).generate(PROMPTS, n=2, sampling=SamplingConfig(temperature=1.0,
                                                                                      max_new_tokens=8))
    assert (r.sampling_logprobs - _reference_logprobs(model, r)).abs().max() < 1e-5
