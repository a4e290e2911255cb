"""Training precision: which dtype the weights the optimizer steps are kept in, and which dtype computes.

`model.dtype` names the compute dtype (auto: bfloat16 on GPU, float32 on CPU). What is stored follows from it:

    full fine-tuning, bf16 / fp16   fp32 master weights, gradients and AdamW state; forwards in bf16 / fp16
                                    (accelerate's mixed_precision: autocast in one process or DDP;
                                    FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); DeepSpeed
                                    ZeRO-3 `bf16.enabled`, where DeepSpeed keeps the fp32 master partitions itself)
    LoRA                            the frozen base in the compute dtype, the adapters in fp32 (peft upcasts them),
                                    no autocast: peft casts at each adapter
    fp32                            fp32 everywhere

Why: an AdamW step moves a weight by about lr (1e-6 in GRPO, 5e-6 in SFT), below half a bf16 ulp of a typical
weight (2^-8 relative), so bf16 weights stepped in place keep ~1% of the updates (measured on the tiny model, see
tests/test_precision.py). The cost is memory: fp32 master weights + fp32 gradients + AdamW's two fp32 moments are
16 bytes per trained parameter, against 8 for bf16 weights, gradients and moments; the forward's bf16 copy of each
weight lives only while it is used. The exported `final/` is cast back to the compute dtype, the size the user
started from; training checkpoints keep the fp32 masters, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import os

import torch

_MIXED = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass(frozen=True)
class Precision:
    weights: torch.dtype        # the dtype parameters are loaded and stepped in
    compute: torch.dtype        # the dtype forwards run in (and `final/` is saved in)

    @property
    def mixed(self) -> bool:
        """Whether forwards run in a lower precision than the stored weights (autocast / FSDP2 policy)."""
        return self.weights != self.compute

    def accelerator_kwargs(self) -> dict:
        """Keyword arguments for `accelerate.Accelerator`: accelerate's mixed_precision for mixed training (with,
        under FSDP2, a policy that reduces gradients in fp32); none otherwise, so `accelerate launch` settings
        stand."""
        if not self.mixed:
            return {}
        kwargs: dict = {"mixed_precision": _MIXED[self.compute]}
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
            from accelerate import FullyShardedDataParallelPlugin

            policy = {"param_dtype": self.compute, "reduce_dtype": torch.float32, "output_dtype": self.compute}
            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(mixed_precision_policy=policy)
        return kwargs

    def describe(self) -> str:
        name = str(self.compute).removeprefix("torch.")
        return f"fp32 master weights, {name} compute" if self.mixed else f"{name} weights"


def training_device() -> torch.device:
    """The device a training process gets (accelerate's: the GPU when there is one)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_precision(compute: torch.dtype, lora: bool) -> Precision:
    """Full fine-tuning in bf16 / fp16 keeps fp32 masters; LoRA keeps the frozen base in `compute` (its adapters
    are fp32); fp32 is fp32."""
    if compute in _MIXED and not lora:
        return Precision(torch.float32, compute)
    return Precision(compute, compute)
