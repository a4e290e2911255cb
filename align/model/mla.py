"""MLA attention of transformers' DeepSeek-V2, made cheaper where align knows more than transformers does.

1. `absorbed_mla`: decode steps of `generate` in the absorbed form, as DeepSeek-V2 §2.1.2 serves.
2. `shared_prefix_kv`: in a training forward over G completions of one prompt, the completions attend to the keys
   and values the prompt's own pass computed (its latent up-projected once per group, not once per row), on a cache
   that only reports the prompt's length.

Absorbed decode.

transformers caches MLA's compressed latent c_KV [B, T, d_c] (after kv_a_layernorm) and the roped shared key
k_pe [B, T, d_r], but at every decode step it up-projects the whole cache through kv_b_proj into per-head keys and
values: B·T·d_c·H·(d_nope + d_v) multiply-adds per layer per step, O(T²) over a completion. On the tiny model that
was ~75% of `generate`'s time. With W_UK [H, d_nope, d_c] and W_UV [H, d_v, d_c] the two halves of kv_b_proj, the
same attention is

    q_lat  = q_nope · W_UK                        [B, H, 1, d_c]
    scores = (q_lat · c_KVᵀ + q_pe · k_peᵀ) · scale  (+ mask), softmax in fp32
    out    = (probs · c_KV) · W_UVᵀ               [B, H, 1, d_v]

which reads the cache once and never builds keys or values. `absorbed_mla(model)` patches the attention modules
for the duration of a `with` block: decode steps (one new token, a cache present) take this path, prefill and
training forward passes the original one. The effective kv_b_proj weight is read at each step, so LoRA adapters
(merged on the fly) and FSDP2 (weights gathered for the layer's forward) need nothing special. Equal to the
original to float rounding (tested in fp32: greedy outputs identical, log-probs within 1e-5).
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .compat import CACHE_KW, attention_signature
from .policy import lora_delta


def _effective_weight(linear) -> torch.Tensor:
    """A Linear's weight, or base + active LoRA deltas for a peft LoRA layer."""
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight
    delta = lora_delta(linear)
    return base.weight if delta is None else base.weight + delta.to(base.weight.dtype)


def _absorbed_forward(self, *args, **kwargs):
    """DeepseekV2Attention.forward with decode steps in the absorbed form. Arguments are bound by name against the
    installed forward's signature (checked by `align.model.fastpaths`); anything but a one-token step with a cache goes to
    the original forward exactly as it was called."""
    bound = self._align_signature.bind(*args, **kwargs).arguments
    hidden_states, cache = bound["hidden_states"], bound.get(CACHE_KW)
    B, S = hidden_states.shape[:-1]
    if S != 1 or cache is None:
        return self._align_original_forward(*args, **kwargs)
    self._align_calls[0] += 1
    attention_mask, position_embeddings = bound.get("attention_mask"), bound["position_embeddings"]
    rope = sys.modules[type(self).__module__].apply_rotary_emb
    H, d_nope, d_v, d_c = self.num_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(B, S, H, self.qk_head_dim).transpose(1, 2)                          # [B, H, 1, d_nope + d_r]
    q_nope, q_pe = torch.split(q, [d_nope, self.qk_rope_head_dim], dim=-1)
    compressed = self.kv_a_proj_with_mqa(hidden_states)
    kv_nope, k_pe = torch.split(compressed, [d_c, self.qk_rope_head_dim], dim=-1)
    c_kv = self.kv_a_layernorm(kv_nope).view(B, 1, S, d_c)                          # [B, 1, 1, d_c]
    k_pe = k_pe.view(B, 1, S, self.qk_rope_head_dim)
    q_pe, k_pe = rope(q_pe, k_pe, position_embeddings.to(q_pe.device))
    c_kv, k_pe = cache.update(c_kv, k_pe, self.layer_idx)                           # [B, 1, T, d_c], [B, 1, T, d_r]
    w = _effective_weight(self.kv_b_proj).view(H, d_nope + d_v, d_c)
    w_uk, w_uv = w[:, :d_nope], w[:, d_nope:]                                      # [H, d_nope, d_c], [H, d_v, d_c]
    c = c_kv.squeeze(1)                                                            # [B, T, d_c]
    q_lat = torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk).reshape(B, H * S, d_c)    # [B, H, d_c]
    scores = torch.bmm(q_lat, c.transpose(1, 2))                                   # [B, H, T] (heads share c)
    scores = scores + torch.bmm(q_pe.reshape(B, H * S, -1), k_pe.squeeze(1).transpose(1, 2))
    scores = (scores * self.scaling).view(B, H, S, -1)                             # [B, H, 1, T]
    if attention_mask is not None:
        mask = attention_mask[..., : scores.shape[-1]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)          # [B, H, 1, T]
    o_lat = torch.bmm(probs.view(B, H * S, -1), c).view(B, H, S, d_c)              # [B, H, 1, d_c]
    out = torch.einsum("bhsc,hvc->bhsv", o_lat, w_uv)                              # [B, H, 1, d_v]
    out = self.o_proj(out.transpose(1, 2).reshape(B, S, H * d_v))
    return out, None


def attention_modules(model) -> list:
    """The DeepSeek-V2 (MLA) attention modules of `model`."""
    return [m for m in model.modules() if type(m).__name__ == "DeepseekV2Attention"]


@contextlib.contextmanager
def install_absorbed(model):
    """Patch `model`'s DeepSeek-V2 attention modules for the block (no version check: `fastpaths` does that).
    Yields a function giving the number of decode steps the absorbed form has taken."""
    modules = attention_modules(model)
    own = [("forward" in m.__dict__) for m in modules]
    calls = [0]
    signature = attention_signature() if modules else None
    for m in modules:
        m._align_original_forward, m._align_signature, m._align_calls = m.forward, signature, calls
        m.forward = types.MethodType(_absorbed_forward, m)
    try:
        yield lambda: calls[0]
    finally:
        for m, had_own in zip(modules, own):
            if had_own:
                m.forward = m._align_original_forward
            else:
                del m.forward
            del m._align_original_forward, m._align_signature, m._align_calls


@contextlib.contextmanager
def absorbed_mla(model, enabled: bool = True):
    """Inside the block, decode steps of `model`'s DeepSeek-V2 attention use the absorbed form when `enabled` (else
    transformers' own attention). No version check here: the caller (`rollout.hf`) passes
    `fastpaths.active("absorbed_mla")`, which stands the path aside, with one warning, where the installed
    transformers fails its check."""
    if not (enabled and attention_modules(model)):
        yield
        return
    with install_absorbed(model):
        yield


def _shared_prefix_expand(self, kv_nope, k_rot):
    """expand_kv for `shared_prefix_kv`: the first call (the prompts) keeps its keys / values; a later one (their
    completions, B·G rows) expands its own positions and puts the prompt's, repeated G times, ahead of them."""
    if self._align_prefix is None:
        self._align_prefix = self._align_original_expand(kv_nope, k_rot)              # [B, H, P, d] each
        return self._align_prefix
    keys, values = self._align_prefix
    new_k, new_v = self._align_original_expand(kv_nope, k_rot)                         # [B*G, H, S, d]
    G = self._align_group
    return (torch.cat([keys.repeat_interleave(G, 0), new_k], 2),                         # [B*G, H, P + S, d]
            torch.cat([values.repeat_interleave(G, 0), new_v], 2))


class _PromptLength(DynamicLayer):
    """A cache layer standing for a prompt of `length` tokens already run: it reports that length (for positions
    and the attention mask) and stores nothing; `shared_prefix_kv` holds the prompt's keys and values."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.length


class _PromptCache(DynamicCache):
    def __init__(self, n_layers: int, length: int):
        Cache.__init__(self, layers=[_PromptLength(length) for _ in range(n_layers)])


@contextlib.contextmanager
def shared_prefix_kv(model, group_size: int):
    """A forward over B prompts, then one over their B·G completions (`forward.forward_shared_prompt`), that
    up-projects (kv_b_proj) each prompt's latent once, not once per row. No version check here: the caller asks
    `fastpaths.active("shared_prefix")` first.

    Yields a function `completion_cache(P)`: the cache for the completion forward. It makes the model
    number positions and mask from P on; the attention layers take the keys and values the prompt forward computed
    (gradients flow back to it), repeated G times, ahead of the completion's own. Yields None for a model without
    MLA attention (the caller then repeats a real cache). transformers would instead up-project every row's copy of
    the prompt's latent: B·G·P rows through kv_b_proj instead of B·P. Keys and values are the same tensors either
    way (tested)."""
    modules = [m for m in attention_modules(model) if hasattr(m, "expand_kv")]
    for m in modules:
        m._align_original_expand, m._align_prefix, m._align_group = m.expand_kv, None, group_size
        m.expand_kv = types.MethodType(_shared_prefix_expand, m)

    try:
        yield (lambda length: _PromptCache(len(modules), length)) if modules else None
    finally:
        for m in modules:
            del m.expand_kv, m._align_original_expand, m._align_prefix, m._align_group
