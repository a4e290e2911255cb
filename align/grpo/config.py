"""`GRPOConfig`: every setting of `align grpo`, with DeepSeekMath's values as defaults where it gives them."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from rewards.combine import RewardSpec

from ..config import ConfigError, check_seed, directory_path, option, require, require_steps
from ..model.policy import ModelConfig
from ..rollout.engines import check_engine
from ..rollout.protocol import RolloutConfig, SamplingConfig
from ..rollout.tools import ToolsConfig
from ..run.finite import NonFinitePolicy, nonfinite_option
from ..run.rundir import ResumeMode, resume_option
from ..run.tracking import WandbConfig
from .core import AGGREGATIONS, CLIP_DEFAULTS, POLICY_LOSSES, LossSettings


@dataclasses.dataclass
class GRPOConfig:
    model: ModelConfig = option(help="The policy (model.path: usually the SFT stage's final/ directory).")
    output_dir: str = option(help="Run directory: checkpoints/, final/, metrics.jsonl.")
    train_data: list[str] = option(help="Prompt files: rows with `prompt` (or `messages`) + columns for rewards.")
    rewards: list[RewardSpec] = option(help="Rewards: [{name: exact_answer, weight: 1, label: ..., args: {...}}]; "
                                       "name is registered, module:function, or an align.rewards entry point; "
                                       "timeout_s (default 300, 0: no limit) bounds each call, isolate: true runs "
                                       "it in a worker process.")
    reward_mode: Literal["sum", "normalize"] = option(
        "sum", "sum: Σ c_k r_k, then group-normalise; normalize: group-normalise each component, then Σ c_k z_k.")
    on_reward_error: Literal["fail", "skip"] = option(
        "fail", "A reward that raises / returns NaN / the wrong count: fail stops the run; skip drops that group.")
    max_skipped_steps: int = option(
        3, "With on_reward_error=skip: stop (naming the reward and its last error) after this many consecutive "
           "steps whose every prompt group was skipped (0: never stop).")
    overlong_prompts: Literal["refuse", "drop", "truncate"] = option(
        "refuse", "A training prompt whose tokens plus sampling.max_new_tokens exceed the model's context: refuse "
        "stops the run before it starts, naming the row; drop leaves such prompts out; truncate cuts each from the "
        "left to fit (its earliest messages, then the start of the first one kept: the end of a prompt, where the "
        "question usually is, stays). Either way the count is printed and logged at step 0 (data/prompts_dropped, "
        "data/prompts_truncated).")
    eval_data: list[str] = option(factory=list, help="Held-out prompts with an `answer` column (greedy accuracy).")
    rollout: RolloutConfig = option(factory=RolloutConfig, help="Rollout engine (hf | vllm) and memory schedule.")
    sampling: SamplingConfig = option(factory=SamplingConfig, help="Rollout sampling settings.")
    tools: ToolsConfig = option(factory=ToolsConfig, help="Multi-turn rollouts with tools (tools.protocol: fence | "
                                "chat; align/rollout/multiturn.py); sampling.max_new_tokens is then the budget of a "
                                "whole sample, turns and tool answers together.")
    group_size: int = option(64, "G: completions sampled per prompt (DeepSeekMath: 64).")
    prompts_per_step: int = option(16, "B: prompts per exploration stage (DeepSeekMath: 1024 samples = 16 x 64).")
    steps: int = option(100, "Exploration stages (rollout -> update) to run.")
    inner_epochs: int = option(1, "μ: passes over each batch of rollouts (DeepSeekMath: 1).")
    minibatches: int = option(1, "Optimizer steps per pass over a batch of rollouts (DeepSeekMath: 1).")
    micro_batch_size: int = option(64, "Sequences per forward / backward (memory bound).")
    lr: float = option(1e-6, "Learning rate (DeepSeekMath: 1e-6).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup_steps: int = option(0, "Optimizer steps of linear warmup.")
    min_lr_ratio: float = option(1.0, "Final lr as a share of the peak (1.0 = constant).")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).")
    beta: float = option(0.04, "β: weight of the k3 KL penalty to the reference (DeepSeekMath: 0.04; 0 skips π_ref).")
    policy_loss: str = option("clip", "Surrogate: clip (the paper's per-token clipped ratio) | gspo (one length-"
                              "normalised ratio per completion; needs aggregation=sequence_mean) | cispo (clipped, "
                              "detached IS weight x log-prob; no lower clip).")
    clip_eps_low: float | None = option(None, "ε_low: ratio clipped below 1 − ε_low (unset: 0.2 for clip, 3e-4 for "
                                        "gspo; cispo has none).")
    clip_eps_high: float | None = option(None, "ε_high: ratio clipped above 1 + ε_high (unset: 0.2 for clip and "
                                         "cispo, 4e-4 for gspo; DAPO: 0.28).")
    tis_cap: float = option(2.0, "C of truncated importance sampling: each token's surrogate is weighted by "
                            "min(π_θold / π_sampler, C) against engine / trainer mismatch (0: off).")
    aggregation: str = option("sequence_mean", "Loss aggregation: sequence_mean (DeepSeekMath) | token_mean (DAPO) "
                              "| constant (Dr. GRPO: divided by completions x sampling.max_new_tokens).")
    scale_rewards: Literal["group", "none"] = option("group", "group: divide by the group's std; none: Dr. GRPO.")
    drop_zero_std_groups: bool = option(False, "Leave out groups whose rewards are all equal (DAPO's filter).")
    mask_truncated: bool = option(False, "Exclude completions cut by max_new_tokens from the loss.")
    balance_alpha: float = option(0.0, "α of the expert-level balance loss during RL (0: off).")
    routing_replay: Literal["none", "old", "rollout"] = option(
        "none", "MoE routes reused across a step's forwards (align/model/routing.py): none; old (R2): the old-policy "
        "forward's routes in every update forward (needs inner_epochs or minibatches > 1: otherwise the update "
        "forward is the old one); rollout (R3): the routes the engine chose while sampling, in the old, reference "
        "(replay_reference) and update forwards.")
    replay_reference: bool = option(True, "With routing_replay=rollout, the reference forward reuses the sampler's "
                                    "routes too (else it routes afresh).")
    freeze_router: bool = option(False, "Keep the MoE gate weights fixed (no gradient), with LoRA or full "
                                 "fine-tuning.")
    routing_metrics_every: int = option(10, "Steps between routing/ agreement metrics (MoE policies; 0: off). A "
                                        "measurement costs up to three no-grad forwards (+35% step time on the tiny "
                                        "model), so the default measures every 10th step; 1 measures every step.")
    ref_offload: bool = option(False, "Keep the frozen reference on CPU between uses (full fine-tuning only).")
    log_completions: int = option(2, "Each step, this many prompts' G completions with their rewards and "
                                  "advantages go to OUTPUT/samples.jsonl (and TensorBoard text); 0: off.")
    eval_every: int = option(10, "Steps between held-out accuracy evaluations (0: start and end only).")
    eval_max_new_tokens: int = option(64, "Completion length for held-out evaluation.")
    save_every: int = option(10, "Steps between checkpoints (0: only at the end).")
    keep_last: int = option(2, "Checkpoints kept (0: all).")
    logprob_chunk: int = option(1024, "Tokens per LM-head chunk.")
    tensorboard: bool = option(True, help="Also write TensorBoard event files (when tensorboard is installed).")
    wandb: WandbConfig = option(factory=WandbConfig,
                                help="Weights & Biases: {project, name, tags} (align/run/tracking.py).")
    seed: int = option(0, "Seed for prompt order and sampling.")
    resume: ResumeMode = resume_option()
    on_nonfinite: NonFinitePolicy = nonfinite_option("reward total, loss or gradient norm")

    def validate(self) -> None:
        self.wandb.validate()
        self.output_dir = directory_path(self.output_dir, "output_dir")
        self.model.validate()
        self.sampling.validate()
        self.rollout.validate()
        self.tools.validate()
        if self.tools.enabled:
            require(self.routing_replay != "rollout", "routing_replay", "none or old with tools.protocol="
                    f"{self.tools.protocol} (the sampler's routes are not recorded across turns)", self.routing_replay)
        check_engine(self.rollout, self.model.dtype, replay_routes=self.routing_replay == "rollout")
        require(bool(self.train_data), "train_data", "at least one file", self.train_data)
        require(bool(self.rewards), "rewards", "at least one reward", self.rewards)
        require(self.group_size >= 2, "group_size", ">= 2 (GRPO compares G samples of one prompt; G = 1 has no "
                "group to normalise against)", self.group_size)
        for key in ("prompts_per_step", "steps", "inner_epochs", "minibatches", "micro_batch_size",
                    "logprob_chunk", "eval_max_new_tokens"):
            require(getattr(self, key) > 0, key, "a positive integer", getattr(self, key))
        require_steps(self.steps, "steps")
        require_steps(self.steps * self.inner_epochs * self.minibatches, "inner_epochs",
                      f"steps {self.steps} x inner_epochs {self.inner_epochs} x minibatches {self.minibatches} updates")
        require(self.prompts_per_step >= self.minibatches, "minibatches",
                "at most prompts_per_step (a minibatch holds whole groups of G completions)", self.minibatches)
        require(self.lr > 0, "lr", "positive", self.lr)
        check_seed(self.seed)
        require(self.max_skipped_steps >= 0, "max_skipped_steps", ">= 0 (0: never stop)", self.max_skipped_steps)
        require(self.beta >= 0, "beta", ">= 0", self.beta)
        require(self.policy_loss in POLICY_LOSSES, "policy_loss", f"one of {sorted(POLICY_LOSSES)}", self.policy_loss)
        if self.policy_loss == "cispo":
            require(self.clip_eps_low is None, "clip_eps_low", "unset with policy_loss=cispo (CISPO clips the "
                    "importance weight from above only)", self.clip_eps_low)
        if self.policy_loss == "gspo":
            require(self.aggregation == "sequence_mean", "aggregation", "sequence_mean with policy_loss=gspo (its "
                    "loss is one value per completion)", self.aggregation)
        low, high = CLIP_DEFAULTS[self.policy_loss]
        self.clip_eps_low = low if self.clip_eps_low is None else self.clip_eps_low
        self.clip_eps_high = high if self.clip_eps_high is None else self.clip_eps_high
        if self.clip_eps_low is not None:
            require(0 <= self.clip_eps_low < 1, "clip_eps_low", "in [0, 1)", self.clip_eps_low)
        require(self.clip_eps_high >= 0, "clip_eps_high", ">= 0", self.clip_eps_high)
        require(self.aggregation in AGGREGATIONS, "aggregation", f"one of {sorted(AGGREGATIONS)}", self.aggregation)
        require(self.tis_cap >= 0, "tis_cap", ">= 0 (0: off)", self.tis_cap)
        changed = self.sampling.truncated()
        require(not changed, changed[0].split("=")[0] if changed else "sampling",
                "off for GRPO training (top_p 1, top_k 0, min_p 0, repetition_penalty 1): the trainer's log-probs "
                "(π_old, π_θ, the KL) are of softmax(logits / temperature), so completions drawn from a truncated or "
                "penalised distribution would bias every step, synchronous or not, and no weight can correct for "
                "tokens it never samples (these settings stay available to evaluation: eval.top_p, ...)",
                ", ".join(changed))
        lag = self.rollout.max_off_policy_steps
        if lag > 0:
            from ..rollout.engines import engine_class

            require(engine_class(self.rollout.engine).runs_ahead, "rollout.max_off_policy_steps",
                    f"0 with rollout.engine={self.rollout.engine} (it shares the trainer's process; rollouts ahead "
                    f"need rollout.engine=vllm_server)", lag)
            require(self.tis_cap > 0, "tis_cap", "> 0 with rollout.max_off_policy_steps > 0 (the truncated "
                    "importance weight is what corrects for samples from an older policy)", self.tis_cap)
        require(self.balance_alpha >= 0, "balance_alpha", ">= 0", self.balance_alpha)
        for i, spec in enumerate(self.rewards):
            require(bool(spec.name), f"rewards[{i}].name", "a reward name", spec.name)
            try:
                spec.check()
            except KeyError as e:
                raise ConfigError(f"key 'rewards[{i}].name': {e.args[0]}") from None
            require(isinstance(spec.timeout_s, (int, float)) and 0 <= spec.timeout_s < math.inf,
                    f"rewards[{i}].timeout_s", "seconds >= 0 (0: no limit)", spec.timeout_s)
        for i, spec in enumerate(self.rewards):
            if spec.name == "environment":
                from ..rollout.tools import toolbox

                require(self.tools.enabled and bool(self.tools.environment) and toolbox(self.tools).env_reward,
                        f"rewards[{i}].name", "used with tools.environment set to a class that has a reward(completion) "
                        "method", spec.name)
        keys = [spec.key for spec in self.rewards]
        require(len(set(keys)) == len(keys), "rewards", "uniquely named (give repeated rewards a label)", keys)
        for key in ("eval_every", "save_every", "keep_last", "warmup_steps", "max_grad_norm", "routing_metrics_every",
                    "log_completions"):
            require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))

    def loss_settings(self) -> LossSettings:
        """The settings of `core.grpo_loss` this config fixes (after `validate`, which fills in the clip defaults)."""
        return LossSettings(policy_loss=self.policy_loss, beta=self.beta, eps_low=self.clip_eps_low,
                            eps_high=self.clip_eps_high, aggregation=self.aggregation,
                            max_tokens=self.sampling.max_new_tokens)
