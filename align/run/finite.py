"""Finite or stop: a non-finite loss, gradient norm or reward total never reaches the weights or a checkpoint.

`on_nonfinite: fail` (default) raises `NonFiniteError` naming the stage, step and quantity before the optimizer
step, so nothing of that step is applied or saved; `skip` drops the step's update (gradients cleared, no optimizer
or scheduler step) and counts it in `train/skipped_nonfinite`.
"""

from __future__ import annotations

import math
from typing import Literal

from ..config import option
from ..errors import NonFiniteError

NonFinitePolicy = Literal["fail", "skip"]


def nonfinite_option(quantities: str):
    """The `on_nonfinite` config field of a stage whose `quantities` are checked."""
    return option("fail", f"A non-finite {quantities}: fail = stop naming the step (nothing applied or saved); "
                          "skip = drop that update (counted in train/skipped_nonfinite).")




def first_nonfinite(values: dict[str, float | None]) -> tuple[str, float] | None:
    """The first (name, value) that is not finite (None values are not measured and pass)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            return name, value
    return None


def check_step(stage: str, step: int, values: dict[str, float | None], policy: str) -> bool:
    """True when every value is finite; else raise (policy fail) or return False (policy skip)."""
    bad = first_nonfinite(values)
    if bad is None:
        return True
    if policy == "skip":
        return False
    raise NonFiniteError(f"{stage} step {step}: {bad[0]} is {bad[1]}; the step was not applied and nothing was "
                         "saved (on_nonfinite=skip drops such steps instead)")


def nonfinite_tensor(tensors) -> str | None:
    """Name of the first floating-point tensor in a mapping (or nested state) that is not all finite."""
    import torch

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            return name if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, (list, tuple)):
            items = enumerate(obj)
        else:
            return None
        for k, v in items:
            found = walk(v, f"{name}.{k}" if name else str(k))
            if found:
                return found
        return None

    return walk(tensors, "")
