"""The reference policy π_ref for GRPO's KL penalty.

* With LoRA: the policy itself with its adapters disabled (`disable_adapter()`): no second copy in memory.
* Without: a frozen copy of the starting weights, optionally kept on CPU and moved to the accelerator only while it
  scores a batch (the paper's offload schedule).
* β = 0: no reference at all (nothing is loaded, `logprobs` returns None).
"""

from __future__ import annotations

import contextlib

import torch

from ..model.policy import ModelConfig, load_policy
from .trajectory import PolicyForward, Trajectory


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

    def logprobs(self, policy, traj: Trajectory, forward: PolicyForward, record_routes: bool = False):
        """π_ref log-probs [N, C] of the trajectory's completion tokens (None when β = 0), and with `record_routes`
        its MoE routes [N, P+C, L, k] (else None)."""
        if not self.enabled:
            return None, None
        if self.use_adapter_off:
            with getattr(policy, "module", policy).disable_adapter():
                return forward.no_grad(policy, traj, record_routes)
        with self._on_device() as model:
            return forward.no_grad(model, traj, record_routes)
