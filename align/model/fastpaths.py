"""The speed paths that reach into transformers internals, and the one check that the installed version still has
what each was written for.

| path            | where                                   | relies on (not public API)                                       |
|-----------------|-----------------------------------------|------------------------------------------------------------------|
| absorbed_mla    | `mla.absorbed_mla` (decode in generate) | DeepseekV2Attention.forward's parameters; its cache holding the  |
|                 |                                         | latent c_KV / k_pe [B, 1, T, d]; its attributes and rope helper  |
| shared_prefix   | `mla.shared_prefix_kv` (GRPO forwards)  | the attention calling `expand_kv(latent, k_pe)` after the cache  |
|                 |                                         | update; a Cache built from a list of DynamicLayer subclasses     |
| prefill_cache   | `kvcache` (ReservedCache, the shared    | DynamicLayer's update / keys / values protocol; `generate`       |
|                 | prefill of each prompt's G samples)     | continuing from a caller's filled cache                          |
| moe_routes      | `routing` (record / replay MoE routes:  | DeepseekV2TopkRouter returning (logits, weights, indices) for    |
|                 | routing_replay, routing/ metrics)       | its [b, t, H] input, and DeepseekV2Moe using what it returns     |

Each path is checked once per process, when first used (or by `align doctor`): first the signature, bound by
name, then a probe that runs the fast path and transformers' own path on a two-layer DeepSeek-V2 built from a
config (random weights, no files, ~0.1 s, the caller's RNG state untouched) and compares the numbers. A path whose
check fails stands aside with one warning naming the installed transformers version and the reason; the run takes
transformers' own path (the same numbers, slower). A path is never half-applied and never silently different.

The paths themselves ask nothing, so that this module sits above every path it probes: the caller that asks
`active` passes the answer as an argument (`rollout.hf` to `mla.absorbed_mla(model, enabled)`,
`logprobs.forward_logprobs` to `forward.forward_rows(..., shared=)`) or leaves the path out (`rollout.hf` for
prefill_cache, `grpo.loop` for moe_routes). What every path reads about the installed version (`CACHE_KW`,
`output_cache`, `attention_signature`) is in `align.model.compat`, below them all.

peft's weight-conversion patch (`policy._exact_targets`) is checked differently: after every adapter is created,
`policy.check_lora_targets` verifies which modules were adapted and refuses a mismatch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

import torch

from .compat import (  # noqa: F401 (re-exported: fastpaths.CACHE_KW, ...)
    ATTENTION_PARAMS,
    CACHE_KW,
    attention_signature,
    output_cache,
    transformers_version,
)


@dataclasses.dataclass(frozen=True)
class PathStatus:
    name: str
    active: bool
    reason: str = ""  # why the path stands aside (empty when active)


def _check_attention_signature() -> None:
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    params = attention_signature().parameters
    missing = [p for p in (*ATTENTION_PARAMS, CACHE_KW) if p not in params]
    if missing:
        raise RuntimeError(f"DeepseekV2Attention.forward has no parameter {', '.join(missing)}")
    if not callable(getattr(m, "apply_rotary_emb", None)):
        raise RuntimeError("modeling_deepseek_v2 has no apply_rotary_emb")


def _check_expand_kv() -> None:
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    expand = getattr(m.DeepseekV2Attention, "expand_kv", None)
    if expand is None:
        raise RuntimeError("DeepseekV2Attention has no expand_kv")
    if list(inspect.signature(expand).parameters)[1:] != ["kv_nope", "k_rot"]:
        raise RuntimeError(f"DeepseekV2Attention.expand_kv{inspect.signature(expand)} is not (kv_nope, k_rot)")
    _check_attention_signature()


def probe_model():
    """A two-layer DeepSeek-V2 (dense + MoE, MLA) with random weights, fp32 on CPU: what each probe runs on."""
    from transformers import DeepseekV2ForCausalLM

    from .presets import preset_config

    cfg = preset_config("tiny", vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DeepseekV2ForCausalLM(cfg).eval()
    return model


def _probe_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 6), generator=g)                          # [2, 6]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0                                                            # left padding
    return ids, mask


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    gap = (a.float() - b.float()).abs().max().item()
    if not gap <= tol:
        raise RuntimeError(f"{what} differs from transformers' own path by {gap:.2e} (tolerance {tol:g})")


@torch.no_grad()
def _probe_absorbed_mla() -> None:
    from transformers.cache_utils import DynamicCache

    from .mla import install_absorbed

    _check_attention_signature()
    model = probe_model()
    ids, mask = _probe_inputs()

    def decode():
        cache = DynamicCache()
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **{CACHE_KW: cache})
        return model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **{CACHE_KW: cache}).logits

    ref = decode()
    with install_absorbed(model) as n_calls:
        fast = decode()
    if n_calls() == 0:
        raise RuntimeError("the decode step never reached the absorbed attention")
    _close(fast, ref, "absorbed-MLA decode")


@torch.no_grad()
def _probe_shared_prefix() -> None:
    from .forward import chunked_token_logprobs, forward_rows, forward_shared_prompt

    _check_expand_kv()
    model = probe_model()
    ids, _ = _probe_inputs()
    completions = torch.randint(3, 64, (4, 3), generator=torch.Generator().manual_seed(1))   # [4, 3]
    ids = torch.cat([ids[:, :4].repeat_interleave(2, 0), completions], 1)              # 2 prompts x G=2
    mask = torch.ones_like(ids)
    mask[:2, :1] = 0
    ref = forward_rows(model, ids, 3, mask, group_size=1).logprobs
    head, hidden, _, _ = forward_shared_prompt(model, model, ids, mask, 3, 2, {})
    fast = chunked_token_logprobs(hidden, head.weight, ids[:, -3:])[0]
    _close(fast, ref, "shared-prefix forward")


@torch.no_grad()
def _probe_prefill_cache() -> None:
    from .kvcache import ReservedCache, prefilled_cache

    model = probe_model()
    ids, mask = _probe_inputs()
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)           # 2 prompts x n=2
    common = dict(max_new_tokens=4, do_sample=False, top_k=None, pad_token_id=0, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, **common)
    cache = prefilled_cache(model, ids, mask, 2, room=5)
    fast = model.generate(input_ids=ids, attention_mask=mask, **{CACHE_KW: cache}, **common)
    fresh = model.generate(input_ids=ids, attention_mask=mask, **{CACHE_KW: ReservedCache(2)}, **common)
    for out, what in ((fast, "generate from the shared prefill"), (fresh, "generate with the reserved cache")):
        if not torch.equal(out.sequences, ref.sequences):
            raise RuntimeError(f"{what} chose other tokens than transformers' own cache")
        _close(torch.stack(out.logits, 1), torch.stack(ref.logits, 1), what)


@torch.no_grad()
def _probe_moe_routes() -> None:
    from .forward import forward_rows
    from .routing import gates

    model = probe_model()
    ids, mask = _probe_inputs()
    if len(gates(model)) != 1:
        raise RuntimeError(f"found {len(gates(model))} MoE gates (DeepseekV2TopkRouter) in a model with one MoE layer")
    ref = forward_rows(model, ids, 3, mask, record_routes=True)
    gate = gates(model)[0]
    other = gate.register_forward_hook(lambda m, a, out: (out[0], out[1], (out[2] + 1) % m.num_experts))
    try:  # a gate that would choose other experts: replay must put the recorded ones back
        rerouted = forward_rows(model, ids, 3, mask).logprobs
        replayed = forward_rows(model, ids, 3, mask, routes=ref.routes, record_routes=True)
    finally:
        other.remove()
    if torch.allclose(rerouted, ref.logprobs):
        raise RuntimeError("the MoE layer does not use the indices its gate returns")
    if not torch.equal(replayed.routes, ref.routes):
        raise RuntimeError("replayed routes were not the ones used")
    _close(replayed.logprobs, ref.logprobs, "routing replay")


PROBES = {
    "absorbed_mla": _probe_absorbed_mla,
    "shared_prefix": _probe_shared_prefix,
    "prefill_cache": _probe_prefill_cache,
    "moe_routes": _probe_moe_routes,
}

WHAT = {
    "absorbed_mla": "absorbed-MLA decode",
    "shared_prefix": "shared-prompt MLA forward",
    "prefill_cache": "reserved KV cache and shared prefill",
    "moe_routes": "MoE route recording and replay",
}

INSTEAD = {"moe_routes": "routes are neither recorded nor replayed (routing_replay acts as none; no routing/ metrics)"}


@functools.cache
def status(name: str) -> PathStatus:
    """Whether fast path `name` works on the installed transformers (checked once per process)."""
    try:
        PROBES[name]()
    except Exception as e:  # any drift of the internals: the path stands aside
        return PathStatus(name, False, f"{type(e).__name__}: {e}")
    return PathStatus(name, True)


def active(name: str) -> bool:
    """`status(name).active`; the first time a path stands aside, one warning says so and why."""
    s = status(name)
    if not s.active and name not in _warned:
        _warned.add(name)
        instead = INSTEAD.get(name, "transformers' own path is used instead (same results, slower)")
        warnings.warn(f"align: the {WHAT[name]} is off on transformers {transformers_version()} ({s.reason}); "
                      f"{instead}. `align doctor` shows every fast path.", RuntimeWarning, stacklevel=2)
    return s.active


_warned: set[str] = set()


def reset() -> None:
    """Forget the checks (tests that simulate a changed transformers)."""
    status.cache_clear()
    _warned.clear()
