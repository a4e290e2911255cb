"""The paper's offload schedule (DeepSeek-V2 §4.2): a model and its optimizer state leave the accelerator while
another phase (vLLM generation) needs the memory, and come back after. On CPU there is nothing to free: no-op."""

from __future__ import annotations

import contextlib

import torch


def move_training_state(model, optimizer, device) -> None:
    """Move `model`'s parameters / buffers and `optimizer`'s state tensors (AdamW moments) to `device`."""
    model.to(device)
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[key] = value.to(device, non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def offloaded(model, optimizer=None, enabled: bool = True):
    """Inside the block `model` (and `optimizer`'s state) live on CPU; they return to their device after it."""
    device = next(model.parameters()).device
    if not enabled or device.type == "cpu":
        yield
        return
    move_training_state(model, optimizer, "cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        move_training_state(model, optimizer, device)
