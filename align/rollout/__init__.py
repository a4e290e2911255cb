"""Rollout engines: generate G completions per prompt. `protocol` defines the records, `hf` the transformers engine."""

from .protocol import RolloutEngine, Rollouts, SamplingConfig

__all__ = ["RolloutEngine", "Rollouts", "SamplingConfig"]
