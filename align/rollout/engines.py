"""The rollout engines by name: `rollout.engine` picks one from ENGINES, `check_engine` refuses settings it cannot
run (at config validation, before any work), `make_engine` starts it.

An engine is a class with
    check(rollout, model_dtype, replay_routes)   classmethod: ConfigError naming the key it cannot serve here
    start(rollout, ctx) -> engine                classmethod: the engine, holding the policy's current weights
    generate(prompts, n, sampling) -> Rollouts   G completions per prompt (align/rollout/protocol.py)
    generate_ids(ids, n, sampling) -> Rollouts   the same from token ids (multi-turn rollouts continue a sequence)
    sync_weights(model), last_sync_s             the policy's new weights after an update
    sync_metrics                                 metrics of the last sync (e.g. rollout/sync_max_abs_diff), may be {}
    close()                                      release what it holds (a server it started); idempotent
    own_weights                                  True when it samples from its own copy of the weights (the policy can
                                                 then wait on CPU while it generates: rollout.offload_policy)
    runs_ahead                                   True when it can generate while the policy trains
                                                 (rollout.max_off_policy_steps > 0, align/grpo/ahead.py)
    cheap_routes                                 True when recording the MoE routes it samples with costs nothing
                                                 (then the routing metrics compare against them)
    sized_by_prompts                             True when it needs the run's longest prompt (EngineContext.max_model_len)
                                                 before it starts: every train prompt is then measured up front
A new engine is one file with such a class and one line in ENGINES.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch

from .protocol import RolloutConfig, RolloutEngine

# name -> "module:class", imported on use (an engine's own dependencies, such as vLLM, are optional)
ENGINES: dict[str, str] = {
    "hf": "align.rollout.hf:HFEngine",          # transformers generate on the policy itself
    "vllm": "align.rollout.vllm:VLLMEngine",    # a colocated vllm.LLM fed by in-memory weight syncs
    "vllm_server": "align.rollout.vllm_server:VLLMServerEngine",  # a vLLM server, weights pushed and verified
}


@dataclasses.dataclass
class EngineContext:
    """What a run hands its engine when it starts it."""

    model: Any                 # the policy as trained (hf samples with it; others take its weights)
    model_path: str            # its checkpoint directory (engines that load the architecture themselves)
    tokenizer: Any
    dtype: torch.dtype         # the compute dtype (a mixed-precision policy's masters are fp32)
    device: torch.device
    seed: int
    max_model_len: int         # the longest prompt + new tokens the run generates
    processes: int = 1         # training processes (sharded weights: transformers generation runs in lock-step)
    record_routes: bool = False  # return the MoE routes each token took (Rollouts.routes)
    step: int = 0              # updates the policy has had (a resumed run's start): the first weight version
    output_dir: str | None = None  # the run directory (an engine's own files: a launched server's log)


def engine_class(name: str) -> type:
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def check_engine(rollout: RolloutConfig, model_dtype: str, replay_routes: bool) -> None:
    """Refuse, naming the key, settings the chosen engine cannot run on this machine."""
    from ..config import require

    require(rollout.engine in ENGINES, "rollout.engine", f"one of {', '.join(ENGINES)}", rollout.engine)
    engine_class(rollout.engine).check(rollout, model_dtype, replay_routes)


def make_engine(rollout: RolloutConfig, ctx: EngineContext) -> RolloutEngine:
    return engine_class(rollout.engine).start(rollout, ctx)
