"""DeepSeek-V2 model shapes: the published configs and the tiny presets used for tests and the CPU quickstart.

Field names are those of transformers' `DeepseekV2Config`. The tiny presets keep the MLA cache width
kv_lora_rank + qk_rope_head_dim = 512 + 64 = 576 of the real models (vLLM's CPU MLA kernel accepts only that width)
and set n_group / topk_group (vLLM's CPU router asserts on null); every other dimension is small.
"""

from __future__ import annotations

from transformers import DeepseekV2Config

_COMMON = dict(
    hidden_act="silu",
    rms_norm_eps=1e-6,
    attention_bias=False,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)

PRESETS: dict[str, dict] = {
    # ~2.3M parameters: 3 layers (first dense), 8 routed experts top-2, 1 shared expert, MLA with q_proj.
    "tiny": dict(
        vocab_size=1024, hidden_size=128, intermediate_size=384, moe_intermediate_size=128,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, topk_method="greedy",
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        max_position_embeddings=512, initializer_range=0.02,
    ),
    # Same, with the low-rank query path of the full DeepSeek-V2 (q_a_proj / q_a_layernorm / q_b_proj).
    "tiny-q-lora": dict(
        vocab_size=1024, hidden_size=128, intermediate_size=384, moe_intermediate_size=128,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=64, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, topk_method="greedy",
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        max_position_embeddings=512, initializer_range=0.02,
    ),
    # deepseek-ai/DeepSeek-V2-Lite: 15.7B total, 2.4B activated.
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, topk_method="greedy",
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        max_position_embeddings=163840, initializer_range=0.02,
    ),
    # deepseek-ai/DeepSeek-V2: 236B total, 21B activated.
    "deepseek-v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_shared_experts=2, n_routed_experts=160, num_experts_per_tok=6, topk_method="group_limited_greedy",
        n_group=8, topk_group=3, norm_topk_prob=False, routed_scaling_factor=16.0,
        max_position_embeddings=163840, initializer_range=0.006,
    ),
}


def preset_config(name: str, **overrides) -> DeepseekV2Config:
    """A `DeepseekV2Config` for a named preset; `overrides` replace single fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    fields = {**_COMMON, **PRESETS[name], **overrides}
    rope_theta = fields.pop("rope_theta")
    config = DeepseekV2Config(**fields)
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    config.architectures = ["DeepseekV2ForCausalLM"]
    return config


def parameter_counts(model) -> tuple[int, int]:
    """(total, activated per token) parameter counts of a DeepSeek-V2 model.

    Total counts every parameter. Activated excludes the input embedding (a lookup, not a matmul) and counts every
    dense parameter plus top-k of the n routed experts in each MoE layer (shared experts are always active): the
    convention of the paper's 236B / 21B. Works on the meta device.
    """
    config = model.config
    total = active = 0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if name.endswith("embed_tokens.weight"):
            continue
        if ".mlp.experts." in name:
            active += n * config.num_experts_per_tok // config.n_routed_experts
        else:
            active += n
    return total, active
