"""What align needs to know about the installed transformers at import time, below every fast path (`align.model.fastpaths`
checks the paths; they and their callers read these).

transformers 5.24 renamed the cache argument of every forward from `past_key_values` to `cache` (the old name is
accepted with a deprecation warning until 5.40); `CACHE_KW` is the name the installed version uses, for every call
align makes with a cache.
"""

from __future__ import annotations

import inspect


def _cache_kw() -> str:
    from transformers import DeepseekV2ForCausalLM

    params = inspect.signature(DeepseekV2ForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


CACHE_KW: str = _cache_kw()  # "cache" (transformers >= 5.24) or "past_key_values"


def output_cache(out):
    """The cache a forward returned (`out.cache` from transformers 5.24, `out.past_key_values` before)."""
    return getattr(out, CACHE_KW, None)


def transformers_version() -> str:
    import transformers

    return transformers.__version__


ATTENTION_PARAMS = ("hidden_states", "attention_mask", "position_embeddings")


def attention_signature() -> inspect.Signature:
    """DeepseekV2Attention.forward's signature (through transformers' deprecation wrappers), without `self`."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    sig = inspect.signature(m.DeepseekV2Attention.forward)
    return sig.replace(parameters=list(sig.parameters.values())[1:])
