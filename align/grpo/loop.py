"""`align grpo`: Group Relative Policy Optimization, no critic (DeepSeekMath §4.1; DeepSeek-V2 §4.2).

One exploration stage, in data-flow order:

    prompts   B rows, chosen by (seed, step) so a resumed run sees the same ones
    rollouts  G completions per prompt from the current policy                           [B*G, C]
    rewards   Σ_k c_k · r_k over the named reward functions                               [B*G]
    advantage A_i = (r_i − mean_group r) / std_group r                                    [B*G]
    update    μ epochs x `minibatches` optimizer steps of the clipped surrogate + β·k3 KL to π_ref
    sync      hand the new weights to the rollout engine
    metrics   reward per component, zero-std groups, KL, clip fraction, entropy, lengths, truncation, expert load

The maths is in `core` (pure functions). Old log-probs: with μ = 1 and one minibatch the policy is still π_θold
when the loss is taken, so the trainer's own detached log-probs serve (ρ = 1 exactly, its gradient is ∇ log π);
otherwise they are computed once by the policy before the first update. The engine's sampling log-probs enter
only through truncated importance sampling (`core.tis_weights`: weight min(π_θold / π_sampler, C) on the
surrogate; ~1 with the transformers engine, the correction for vLLM's kernels and precision), and their gap to
π_θold is logged. Log-probs use logits / sampling temperature, the distribution the completions were drawn from.

Engines (`rollout.engine`): hf samples with the policy itself; vllm is a colocated vllm.LLM that gets the new
weights in memory after every update (perf/sync_s) and, on GPU, sleeps while the policy trains; the policy can
be offloaded to CPU while vLLM generates (`rollout.offload_policy`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from rewards.combine import RewardError, check_columns, close_rewards, score

from .. import checkpoint as ckpt
from ..allocator import keep_freed_memory
from ..config import ConfigError, config_to_dict
from ..data import batch_indices, load_prompts
from ..evaluate import accuracy
from ..faults import fault_point
from ..finite import check_step
from ..logprobs import forward_logprobs
from ..metrics import MetricsLogger, progress
from ..moe import expert_balance_loss, expert_load, routing_kwargs
from ..offload import offloaded
from ..optim import build_optimizer, warmup_cosine
from ..policy import check_model_dir, is_deepseek_v2, load_for_training, load_tokenizer
from ..rollout.hf import HFEngine
from ..rollout.protocol import RolloutEngine
from ..rundir import claim_all
from .config import GRPOConfig
from .core import (
    group_advantages,
    grpo_loss,
    loss_denominator,
    mismatch_stats,
    tis_weights,
    zero_std_groups,
)
from .reference import Reference


def _prompt_batch(rows, cfg: GRPOConfig, step: int, rank: int = 0, world: int = 1):
    """This process's share of step `step`'s B prompts (B / world consecutive ones), each repeated G times."""
    picked = [rows[i] for i in batch_indices(len(rows), cfg.prompts_per_step, step, cfg.seed)]
    share = cfg.prompts_per_step // world
    picked = picked[rank * share:(rank + 1) * share]
    G = cfg.group_size
    prompts = [r.messages for r in picked for _ in range(G)]                       # N prompts (repeated G times)
    names = sorted({k for r in picked for k in r.columns})
    columns = {k: [r.columns.get(k) for r in picked for _ in range(G)] for k in names}
    return picked, prompts, columns


def _policy_logprobs(model, batch: dict, rows: torch.Tensor, cfg: GRPOConfig, **kw):
    """Log-probs of the completion tokens of `rows` (whole groups: each group's prompt runs once)."""
    return forward_logprobs(model, batch["input_ids"][rows], batch["n"], batch["attention_mask"][rows],
                            chunk_tokens=cfg.logprob_chunk, temperature=cfg.sampling.temperature or 1.0,
                            group_size=cfg.group_size, **kw)


def _micro_size(cfg: GRPOConfig) -> int:
    """Sequences per forward: micro_batch_size rounded down to whole groups (at least one group)."""
    return max(cfg.micro_batch_size // cfg.group_size, 1) * cfg.group_size


@torch.no_grad()
def _logprobs_no_grad(model, batch: dict, cfg: GRPOConfig) -> torch.Tensor:
    n_rows = batch["input_ids"].shape[0]
    parts = [_policy_logprobs(model, batch, torch.arange(s, min(s + _micro_size(cfg), n_rows)), cfg).logprobs
             for s in range(0, n_rows, _micro_size(cfg))]
    return torch.cat(parts)                                                        # [N, C]


def _router_mask(out, batch: dict, micro: torch.Tensor) -> torch.Tensor:
    """[tokens] 1 on the real tokens of `out.router_logits`' rows (the shared-prompt forward lays them out itself)."""
    return out.router_mask if out.router_mask is not None else batch["attention_mask"][micro].reshape(-1)


def _micro_loss(model, batch: dict, micro: torch.Tensor, den: torch.Tensor, cfg: GRPOConfig, moe):
    """One micro-batch's share of the minibatch loss (numerator / the minibatch's global denominator)."""
    mask = batch["loss_mask"][micro]                                               # [n, C]
    out = _policy_logprobs(model, batch, micro, cfg, with_entropy=True, router_logits=moe is not None)
    logprobs = out.logprobs                                                        # [n, C]
    old = batch["old_logprobs"][micro] if batch["old_logprobs"] is not None else logprobs.detach()
    ref = batch["ref_logprobs"][micro] if batch["ref_logprobs"] is not None else None
    sampled = batch["sampling_logprobs"][micro]                                    # [n, C] the engine's
    loss, tok = grpo_loss(logprobs, old, ref, batch["advantages"][micro], mask, cfg.beta, cfg.clip_eps_low,
                          cfg.clip_eps_high, cfg.aggregation, cfg.sampling.max_new_tokens,
                          weights=tis_weights(old, sampled, cfg.tis_cap), policy_loss=cfg.policy_loss,
                          denominator=den, with_stats=True)
    balance = torch.zeros((), device=logprobs.device)
    if moe is not None and cfg.balance_alpha > 0:
        balance = expert_balance_loss(out.router_logits, moe["top_k"], cfg.balance_alpha,
                                      _router_mask(out, batch, micro), **moe["routing"])
    return loss, balance, out, logprobs, old, sampled, tok


def _update(model, optimizer, scheduler, accelerator, batch: dict, cfg: GRPOConfig, moe, gen, step: int = 0):
    """μ epochs x minibatches optimizer steps over one batch of rollouts.

    Returns statistics averaged over the updates, and the last micro-batch's router logits with its token mask
    (for expert load).
    """
    n_rows = batch["input_ids"].shape[0]
    mask = batch["loss_mask"]                                                      # [N, C]
    stats: dict[str, list[float]] = {k: [] for k in ("loss/policy", "loss/kl", "loss/clip_frac", "loss/balance",
                                                     "policy/entropy", "policy/ratio", "train/grad_norm",
                                                     "rollout/logprob_gap", "rollout/kl_sampler",
                                                     "rollout/tis_clip_frac", "train/skipped_nonfinite")}
    router_logits, token_mask = (), None
    G = cfg.group_size if n_rows % cfg.group_size == 0 else 1
    for epoch in range(cfg.inner_epochs):
        groups = torch.randperm(n_rows // G, generator=gen)                            # rows stay in their groups
        for chunk in groups.chunk(min(cfg.minibatches, len(groups))):
            rows = (chunk[:, None] * G + torch.arange(G)).reshape(-1)                  # [rows of whole groups]
            minibatch_loss = 0.0
            den = loss_denominator(mask[rows], cfg.aggregation, cfg.sampling.max_new_tokens)
            # the loss is normalised by the global count (all processes); data-parallel gradients are averaged
            # over processes, hence x world: the update equals one process taking the whole global batch
            den = accelerator.reduce(den, reduction="sum").clamp_min(1) / accelerator.num_processes
            micros = rows.split(_micro_size(cfg))
            for i, micro in enumerate(micros):
                sync = accelerator.no_sync(model) if i < len(micros) - 1 else contextlib.nullcontext()
                with sync:  # gradients are all-reduced once per minibatch, at its last micro-batch
                    loss, balance, out, logprobs, old, sampled, tok = _micro_loss(model, batch, micro, den, cfg,
                                                                                  moe)
                    accelerator.backward(loss + balance * len(micro) / len(rows))
                m = mask[micro].bool()
                if m.any():
                    if cfg.beta > 0:  # with β = 0 nothing is measured, and nothing is logged
                        stats["loss/kl"].append(tok["kl"][m].mean().item())
                    stats["loss/clip_frac"].append(tok["clipped"][m].float().mean().item())
                    stats["policy/ratio"].append(tok["ratio"][m].mean().item())
                    stats["policy/entropy"].append(out.entropy[m].mean().item())
                    if epoch == 0:  # engine's sampling log-probs vs the trainer's π_θold
                        for k, v in mismatch_stats(old, sampled, m, cfg.tis_cap).items():
                            stats[k].append(v)
                minibatch_loss += loss.item()
                stats["loss/balance"].append(balance.item())
                router_logits, token_mask = out.router_logits, _router_mask(out, batch, micro)
            stats["loss/policy"].append(minibatch_loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            # None under DeepSpeed, which clips inside its own step
            grad_norm = None if grad_norm is None else float(grad_norm)
            stats["train/grad_norm"].append(float("nan") if grad_norm is None else grad_norm)
            if check_step("grpo", step, {"loss/policy": minibatch_loss, "train/grad_norm": grad_norm},
                          cfg.on_nonfinite):
                optimizer.step()
                scheduler.step()
            else:
                stats["train/skipped_nonfinite"].append(1.0)
            optimizer.zero_grad(set_to_none=True)
    skipped = float(len(stats.pop("train/skipped_nonfinite")))
    if not stats["loss/kl"]:
        del stats["loss/kl"]
    averaged = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
    return {**averaged, "train/skipped_nonfinite": skipped}, (router_logits, token_mask)


def _mean_over_processes(metrics: dict[str, float], world: int) -> dict[str, float]:
    """Each metric averaged over the processes that report it (every process logs its own share of the batch)."""
    if world == 1:
        return metrics
    import torch.distributed as dist

    every: list[dict] = [None] * world
    dist.all_gather_object(every, metrics)
    keys = sorted({k for m in every for k in m})
    return {k: sum(m[k] for m in every if k in m) / sum(k in m for m in every) for k in keys}


def train_grpo(cfg: GRPOConfig) -> dict:
    """Run GRPO to `cfg.steps` (resuming from the newest checkpoint in output_dir); returns a summary."""
    keep_freed_memory()  # the process reuses freed activations instead of faulting them in again
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # -- everything that can fail on bad input happens before the first write
    model_json = check_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model.path)
    train_rows = [r for path in cfg.train_data for r in load_prompts(path)]
    context = model_json.get("max_position_embeddings")
    if context:
        for r in train_rows:
            text = tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n + cfg.sampling.max_new_tokens > context:
                raise ConfigError(f"{r.columns['row']}: prompt of {n} tokens + sampling.max_new_tokens="
                                  f"{cfg.sampling.max_new_tokens} exceeds the model's context of {context} tokens")
    eval_rows = [r for path in cfg.eval_data for r in load_prompts(path)]
    for r in eval_rows:
        if r.columns.get("answer") is None:
            raise ConfigError(f"{r.columns['row']}: eval_data rows need an 'answer' column for held-out accuracy")
    try:
        check_columns(cfg.rewards, [r.columns for r in train_rows])
    except RewardError as e:
        raise ConfigError(str(e)) from None

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU: gloo across processes
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.prompts_per_step % world:
        raise ConfigError(f"key 'prompts_per_step' must be a multiple of the {world} processes (each takes an "
                          f"equal share of the prompts), got {cfg.prompts_per_step}")
    if cfg.minibatches > cfg.prompts_per_step // world:
        raise ConfigError(f"key 'minibatches' must be at most the {cfg.prompts_per_step // world} prompt groups "
                          f"each of the {world} processes holds (a minibatch holds whole groups), got "
                          f"{cfg.minibatches}")
    set_seed(cfg.seed + rank)  # each process samples its own completions
    device = accelerator.device
    claim_all(accelerator, cfg.output_dir, "grpo", cfg)  # before any write: the directory is this run's
    resume = ckpt.latest_checkpoint(cfg.output_dir)
    model = load_for_training(cfg.model, device, resume)
    moe = None
    if is_deepseek_v2(model.config):
        moe = {"top_k": model.config.num_experts_per_tok, "routing": routing_kwargs(model.config)}
    elif cfg.balance_alpha > 0:
        raise ConfigError(f"balance_alpha={cfg.balance_alpha} needs a DeepSeek-V2 MoE model; {cfg.model.path} is "
                          f"{model.config.model_type!r}")
    reference = Reference(cfg.model, cfg.beta, device, cfg.ref_offload)
    n_updates = cfg.steps * cfg.inner_epochs * cfg.minibatches
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, n_updates, cfg.warmup_steps, cfg.min_lr_ratio)
    start, history = 0, {}
    if resume is not None:
        state = ckpt.load_training_state(resume, optimizer, scheduler)
        start, history = state["step"], state.get("history", {})
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    engine: RolloutEngine
    if cfg.rollout.engine == "vllm":
        from ..rollout.vllm import VLLMEngine

        engine = VLLMEngine(cfg.model.path, tokenizer, cfg.rollout, dtype=next(model.parameters()).dtype,
                            device=device, seed=cfg.seed + rank, max_model_len=context or 4096)
        engine.sync_weights(model)  # resumed or adapted weights, not the ones on disk
    else:  # sharded weights (FSDP2 / ZeRO-3): every process takes part in each decode step
        engine = HFEngine(accelerator.unwrap_model(model), tokenizer, synced=world > 1)
    log = MetricsLogger(cfg.output_dir, enabled=accelerator.is_main_process, tensorboard=cfg.tensorboard,
                        prefix="grpo ")
    if accelerator.is_main_process:
        log.truncate_after(start)
    G, needs_old = cfg.group_size, cfg.inner_epochs > 1 or cfg.minibatches > 1
    if accelerator.is_main_process:
        print(f"grpo: {len(train_rows)} prompts, {cfg.steps} steps of {cfg.prompts_per_step} x G={G}"
              f"{f' over {world} processes' if world > 1 else ''}, "
              f"{'resuming at step ' + str(start) if resume else 'new run'}", flush=True)
    if eval_rows and start == 0:
        history["accuracy_start"] = accuracy(engine, eval_rows, cfg.eval_max_new_tokens)["accuracy"]
        log.log(0, {"eval/accuracy": history["accuracy_start"]})

    for step in progress(range(start, cfg.steps), cfg.steps, start, "grpo", accelerator.is_main_process):
        t0 = time.time()
        # 1. rollouts: G completions per prompt from the current policy
        picked, prompts, columns = _prompt_batch(train_rows, cfg, step, rank, world)
        with offloaded(model, optimizer, enabled=cfg.rollout.offload_policy and cfg.rollout.engine == "vllm"):
            rollouts = engine.generate([r.messages for r in picked], n=G, sampling=cfg.sampling)
        fault_point("generation", step + 1)
        t_gen = time.time()
        # 2. rewards, per component and weighted total
        scores = score(cfg.rewards, prompts, rollouts.completions, columns, columns["row"], G, cfg.reward_mode,
                       cfg.on_reward_error)
        fault_point("scoring", step + 1)
        t_reward = time.time()
        kept = scores.total[scores.keep]
        kept = kept[~kept.isnan()]                                                 # NaN: unscored, not bad
        rewards_ok = check_step("grpo", step + 1, {"reward/total": kept.sum().item()}, cfg.on_nonfinite)
        # 3. group-normalised advantages (optionally dropping groups with no signal, and skipped groups)
        advantages = group_advantages(scores.total, G, cfg.scale_rewards)           # [N]
        zero = zero_std_groups(scores.total, G)                                     # [B]
        keep = scores.keep & ~(zero.repeat_interleave(G) & cfg.drop_zero_std_groups)  # [N]
        if not keep.all() and world == 1:
            rows = keep.nonzero().squeeze(-1)
            rollouts, advantages = rollouts.select(rows), advantages[rows]
        elif not keep.all():  # several processes: keep the rows (equal work everywhere), take them out of the loss
            advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
        metrics = {**scores.metrics(), "reward/zero_std_frac": zero.float().mean().item(),
                   "rollout/completion_len": rollouts.completion_mask.sum(1).float().mean().item(),
                   "rollout/truncated_frac": rollouts.truncated.float().mean().item()}
        if rollouts.completion_ids.shape[0] > 0 and rewards_ok:  # skip policy: a bad step trains on nothing
            # 4. token layout: prompt (left-padded) + completion (right-padded); loss on completion tokens
            loss_mask = rollouts.completion_mask.clone()                            # [N, C]
            if cfg.mask_truncated:
                loss_mask[rollouts.truncated] = 0
            if world > 1:
                loss_mask[~keep] = 0
            batch = {"input_ids": torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1).to(device),
                     "attention_mask": torch.cat([rollouts.prompt_mask, rollouts.completion_mask], 1).to(device),
                     "loss_mask": loss_mask.to(device), "advantages": advantages.to(device),
                     "sampling_logprobs": rollouts.sampling_logprobs.to(device),
                     "n": rollouts.completion_ids.shape[1]}
            # 5. old (only when the policy moves between minibatches) and reference log-probs, no grad
            batch["old_logprobs"] = _logprobs_no_grad(model, batch, cfg) if needs_old else None
            batch["ref_logprobs"] = reference.logprobs(
                model, batch["input_ids"], batch["attention_mask"], batch["n"], cfg.logprob_chunk,
                cfg.sampling.temperature or 1.0, _micro_size(cfg), G)
            t_ref = time.time()
            # 6. μ epochs of clipped-surrogate updates
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)  # minibatch order: a function of step
            update_stats, (router_logits, token_mask) = _update(model, optimizer, scheduler, accelerator, batch, cfg,
                                                                moe, gen, step + 1)
            metrics.update(update_stats)
            fault_point("update", step + 1)
            if moe is not None:
                metrics.update(expert_load(router_logits, moe["top_k"], token_mask, **moe["routing"]))
            metrics.update({"perf/ref_s": t_ref - t_reward, "perf/update_s": time.time() - t_ref})
        # 7. weight sync to the rollout engine
        engine.sync_weights(model)
        metrics.update({"perf/generate_s": t_gen - t0, "perf/sync_s": engine.last_sync_s,
                        "perf/reward_s": t_reward - t_gen,
                        "perf/step_s": time.time() - t0, "train/lr": scheduler.get_last_lr()[0]})
        done = step + 1
        if eval_rows and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            history["accuracy_last"] = metrics["eval/accuracy"] = accuracy(
                engine, eval_rows, cfg.eval_max_new_tokens)["accuracy"]
        log.log(done, _mean_over_processes(metrics, world))
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            ckpt.save_training_checkpoint(accelerator, model, tokenizer, cfg.output_dir, done, optimizer, scheduler,
                                          {"history": history, "config": config_to_dict(cfg)}, cfg.keep_last)
    final = ckpt.export_final(accelerator, model, tokenizer, Path(cfg.output_dir) / "final")
    log.close()
    close_rewards(cfg.rewards)
    summary = {"final": str(final), "steps": cfg.steps, **history}
    if "accuracy_start" in history and "accuracy_last" in history:
        print(f"grpo: held-out accuracy {history['accuracy_start']:.1%} -> {history['accuracy_last']:.1%}",
              flush=True)
    return summary
