"""The policy's current weights as a rollout engine loads them: LoRA merged on the fly, checkpoint names.

`merged_state_dict` never modifies the model: each adapted weight is returned as W + ΔW with ΔW from peft's own
`get_delta_weight` (so fan-in/fan-out, scaling and the fused-expert einsum are peft's), while the model keeps W and
the adapters. (peft's `merge_adapter()` / `unmerge_adapter()` pair adds then subtracts ΔW in place, which drifts the
base weights by float rounding every step.)

`checkpoint_state_dict` turns transformers' in-memory layout (routed experts fused into 3-D `gate_up_proj` /
`down_proj`) back into the per-expert checkpoint names other loaders (vLLM) expect, with transformers'
`revert_weight_conversion`.

Both have a streaming form (`iter_merged_weights`, `iter_checkpoint_weights`): one tensor at a time, gathered (under
FSDP2), merged and renamed only when the consumer asks for it. The vLLM sync hands that stream to vLLM's loader,
so a sync holds one full tensor at a time beside the shards instead of the whole model (a 15.7B Lite is 31 GB in
bf16).
"""

from __future__ import annotations

import re

import torch

from ..model.policy import causal_lm, lora_delta

_BASE_LAYER = re.compile(r"\.base_layer(?=\.|$)")


def unwrap(model):
    """The module under accelerate / DDP wrappers."""
    return getattr(model, "module", model)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (DTensor; a collective: every process calls it in the same order)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def iter_merged_weights(model):
    """(name, full tensor) for every weight under the base model's own names, LoRA deltas added, one at a time.

    Lazy: each tensor is gathered (FSDP2) and merged when the consumer takes it, so only one is whole at a time.
    Under FSDP2 every process must consume the stream in full, in step (each gather is a collective)."""
    inner = unwrap(model)
    if not hasattr(inner, "peft_config"):
        for k, v in inner.state_dict().items():
            yield k, _full(v)
        return
    from peft.tuners.lora import LoraLayer, ParamWrapper

    base = inner.get_base_model()
    adapted = {f"{_BASE_LAYER.sub('', name)}.{m.parameter_name if isinstance(m, ParamWrapper) else 'weight'}": m
               for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for k, v in base.state_dict().items():
        if ".lora_" in k:
            continue
        name, t = _BASE_LAYER.sub("", k), _full(v)
        if name in adapted:
            with torch.no_grad():
                delta = lora_delta(adapted[name])
                if delta is not None:
                    t = t + _full(delta).to(t.dtype)
        yield name, t


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """Full-model weights {name: tensor} under the base model's own names, LoRA deltas added; no copies without LoRA.

    Under FSDP2 the shards are gathered (every process calls this, in step)."""
    return dict(iter_merged_weights(model))


def iter_checkpoint_weights(model, weights):
    """The (name, tensor) stream `weights` renamed / split into the checkpoint layout, one entry at a time."""
    from transformers.core_model_loading import revert_weight_conversion

    base = causal_lm(model)
    for name, t in weights:
        yield from revert_weight_conversion(base, {name: t}).items()


def checkpoint_state_dict(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` renamed / split into the checkpoint layout (per-expert `experts.{i}.gate_proj.weight` ...)."""
    return dict(iter_checkpoint_weights(model, state_dict.items()))
