"""The reference policy π_ref for GRPO's KL penalty.

* With LoRA: the policy itself with its adapters disabled (`disable_adapter()`): no second copy in memory.
* Without: a frozen copy of the starting weights, optionally kept on CPU and moved to the accelerator only while it
  scores a batch (the paper's offload schedule).
* β = 0: no reference at all (nothing is loaded, `logprobs` returns None).
"""

from __future__ import annotations

import contextlib

import torch

from ..logprobs import forward_logprobs
from ..policy import ModelConfig, load_policy


class Reference:
    def __init__(self, model_cfg: ModelConfig, beta: float, device, offload: bool = False):
        self.enabled = beta > 0
        self.use_adapter_off = self.enabled and model_cfg.lora.enabled
        self.device = torch.device(device)
        self.offload = offload and self.device.type != "cpu"
        self.model = None
        if self.enabled and not self.use_adapter_off:
            frozen_cfg = ModelConfig(path=model_cfg.path, dtype=model_cfg.dtype, experts_impl=model_cfg.experts_impl)
            self.model = load_policy(frozen_cfg, "cpu" if self.offload else self.device, trainable=False)

    @contextlib.contextmanager
    def _on_device(self):
        if self.offload:
            self.model.to(self.device)
        try:
            yield self.model
        finally:
            if self.offload:
                self.model.to("cpu")
                torch.cuda.empty_cache()

    @torch.no_grad()
    def logprobs(self, policy, input_ids, attention_mask, n_targets: int, chunk_tokens: int, temperature: float,
                 micro_batch: int, group_size: int = 1) -> torch.Tensor | None:
        """π_ref log-probs [N, n_targets] of the last n_targets tokens, or None when β = 0."""
        if not self.enabled:
            return None
        if self.use_adapter_off:
            with getattr(policy, "module", policy).disable_adapter():
                return self._score(policy, input_ids, attention_mask, n_targets, chunk_tokens, temperature,
                                   micro_batch, group_size)
        with self._on_device() as model:
            return self._score(model, input_ids, attention_mask, n_targets, chunk_tokens, temperature, micro_batch,
                               group_size)

    @staticmethod
    def _score(model, input_ids, attention_mask, n_targets, chunk_tokens, temperature, micro_batch, group_size):
        out = []
        for s in range(0, input_ids.shape[0], micro_batch):
            out.append(forward_logprobs(model, input_ids[s:s + micro_batch], n_targets,
                                        attention_mask[s:s + micro_batch], chunk_tokens=chunk_tokens,
                                        temperature=temperature, group_size=group_size).logprobs)
        return torch.cat(out)
