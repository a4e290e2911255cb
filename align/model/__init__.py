"""The DeepSeek-V2 policy and what runs it fast: loading, LoRA, precision, MLA, MoE routing, log-probs, fast paths."""
