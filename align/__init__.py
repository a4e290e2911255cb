"""align: the DeepSeek-V2 alignment pipeline (SFT, GRPO) for DeepSeek-style MoE models."""

__version__ = "0.1.0"
