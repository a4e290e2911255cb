"""Token log-probabilities without materialising the full [tokens, vocab] logits.

`chunked_token_logprobs` projects hidden states through the LM head `chunk_tokens` rows at a time; under autograd
each chunk is checkpointed, so backward recomputes one chunk's logits at a time too. Peak extra memory is
chunk_tokens x vocab floats instead of tokens x vocab (DeepSeek-V2: 102,400-token vocabulary, 3.4 GB of bf16 logits
per 16k tokens).

`forward_logprobs` runs a (peft / accelerate wrapped) causal LM through its own forward, so wrappers' hooks run,
with the LM head swapped for a capture of the final hidden states, then applies the chunked projection.

With `group_size` = G > 1 and rows laid out as groups of G sharing one prompt (GRPO's rollouts), the prompt is run
once per group: a forward over the B distinct prompts returns its KV cache, which is repeated G times along the
batch (autograd flows back through the repeat into the shared prompt), then the N = B·G completions run on it.
The same log-probs and gradients as running every row whole (tested), for B·P + N·C tokens instead of N·(P + C).
Not under gradient checkpointing (transformers turns the cache off there), nor when a group's prompts differ:
then every row runs whole.

The computation is in `align.model.forward`, below `align.model.fastpaths` (whose probes run it); this module takes the one
decision that asks `fastpaths`: whether a group's prompt runs once.
"""

from __future__ import annotations

import torch

from .forward import (  # noqa: F401 (re-exported: align.model.logprobs.chunked_token_logprobs, ...)
    CHECKPOINT_ABOVE,
    ForwardOut,
    chunked_token_logprobs,
    forward_rows,
    token_logprobs_reference,
)


def _shared_prompt(input_ids, attention_mask, n_targets: int, group_size: int, model) -> bool:
    """Whether rows come as groups of `group_size` with one prompt each (and the model can run them that way:
    for MLA, where `fastpaths` finds the installed transformers as `mla.shared_prefix_kv` was written for)."""
    from . import fastpaths

    n, width = input_ids.shape
    if group_size < 2 or n % group_size or width <= n_targets or attention_mask is None:
        return False
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return False  # transformers drops the cache under activation checkpointing in training
    if getattr(model.config, "model_type", None) == "deepseek_v2" and not fastpaths.active("shared_prefix"):
        return False
    prompts = input_ids[:, : width - n_targets].reshape(n // group_size, group_size, -1)
    masks = attention_mask[:, : width - n_targets].reshape(n // group_size, group_size, -1)
    return bool((prompts == prompts[:, :1]).all() and (masks == masks[:, :1]).all())


def forward_logprobs(model, input_ids: torch.Tensor, n_targets: int, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None, chunk_tokens: int = 1024, temperature: float = 1.0,
                     with_entropy: bool = False, router_logits: bool = False, group_size: int = 1,
                     routes: torch.Tensor | None = None, record_routes: bool = False) -> ForwardOut:
    """Log-probs of the last `n_targets` tokens of each row of `input_ids` [B, T] under `model`.

    `group_size`: rows come in groups of that many sharing one prompt (see the module docstring). `routes`
    [B, T, L, k]: MoE routes to replay (align/model/routing.py); `record_routes`: return the routes used as
    `ForwardOut.routes`."""
    from .policy import causal_lm

    shared = position_ids is None and _shared_prompt(input_ids, attention_mask, n_targets, group_size,
                                                     causal_lm(model))
    return forward_rows(model, input_ids, n_targets, attention_mask, position_ids, chunk_tokens, temperature,
                        with_entropy, router_logits, group_size, routes, record_routes, shared=shared)
