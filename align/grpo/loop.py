"""`align grpo`: Group Relative Policy Optimization, no critic (DeepSeekMath §4.1; DeepSeek-V2 §4.2).

One exploration stage, in data-flow order:

    prompts   B rows, chosen by (seed, step) so a resumed run sees the same ones
    rollouts  G completions per prompt from the current policy                           [B*G, C]
    rewards   Σ_k c_k · r_k over the named reward functions                               [B*G]
    advantage A_i = (r_i − mean_group r) / std_group r                                    [B*G]
    update    μ epochs x `minibatches` optimizer steps of the clipped surrogate + β·k3 KL to π_ref
    sync      hand the new weights to the rollout engine
    metrics   reward per component, zero-std groups, KL, clip fraction, entropy, lengths, truncation, expert load,
              routing agreement (policy vs itself before the update, vs π_ref, vs the sampler)

Set-up, resume, checkpoints and the finiteness check are the shared trainer's (`align.run.trainer`); each step below
is one call into a tested function: `rewards.combine.score`, `trajectory.build_trajectory` (advantages, loss mask,
dropped groups, into one typed `Trajectory`), `PolicyForward` (every log-prob forward), `core.grpo_loss` (the
maths, pure functions). Old log-probs: with μ = 1 and one minibatch the policy is still π_θold
when the loss is taken, so the trainer's own detached log-probs serve (ρ = 1 exactly, its gradient is ∇ log π);
otherwise they are computed once by the policy before the first update. The engine's sampling log-probs enter
only through truncated importance sampling (`core.tis_weights`: weight min(π_θold / π_sampler, C) on the
surrogate; ~1 with the transformers engine, the correction for vLLM's kernels and precision), and their gap to
π_θold is logged. Log-probs use logits / sampling temperature, the distribution the completions were drawn from.

MoE routing (`align.model.routing`): with `routing_replay=old` (R2) the old forward's top-k experts per token are
reused by every update forward of the step, so ρ compares one network and not two routings; with `rollout` (R3)
the experts the engine chose while sampling are reused by the old, reference and update forwards. The weights of
the replayed experts come from the current router, so the router still learns (unless `freeze_router`). Not in
the paper, which trains the router freely and keeps its balance losses (`balance_alpha`, off by default in RL).

Engines (`rollout.engine`): hf samples with the policy itself; vllm is a colocated vllm.LLM that gets the new
weights in memory after every update (perf/sync_s) and, on GPU, sleeps while the policy trains; the policy can
be offloaded to CPU while vLLM generates (`rollout.offload_policy`); vllm_server is a separate vLLM server (its
own tensor / expert parallelism, other GPUs or nodes) that gets the weights pushed after every update and checked
against the trainer on a probe (rollout/sync_max_abs_diff). With rollout.max_off_policy_steps = L > 0 (vllm_server
only) step k+1's completions are sampled while step k trains, from a policy at most L versions old
(`align/grpo/ahead.py`: rollout/staleness, perf/overlap_s); the truncated importance weight corrects for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence

import torch

from rewards.combine import RewardError, Scores, check_columns, close_rewards, score

from ..config import ConfigError
from ..evaluate import accuracy
from ..faults import fault_point
from ..model import fastpaths
from ..model.hub import model_dir
from ..model.policy import check_model_dir, load_tokenizer
from ..rollout.engines import EngineContext, engine_class, make_engine
from ..rollout.multiturn import ToolRollouts
from ..rollout.protocol import RolloutEngine
from ..rollout.tools import toolbox
from ..run.data import DataError, PromptRow, batch_indices, check_tools_rendered, load_prompts, prompt_rows
from ..run.finite import check_step
from ..run.offload import offloaded
from ..run.trainer import Run, start_run, world_size
from .ahead import RolloutsAhead
from .config import GRPOConfig
from .core import (
    LossSettings,
    group_advantages,
    grpo_loss,
    loss_denominator,
    mismatch_stats,
    normalized_total,
    tis_weights,
    weighted_sum,
)
from .reference import Reference
from .samples import sample_rows, write_samples
from .trajectory import PolicyForward, Trajectory, build_trajectory


def _step_prompts(rows: Sequence[PromptRow], cfg: GRPOConfig, step: int, rank: int = 0, world: int = 1):
    """This process's share of step `step`'s B prompts (B / world consecutive ones of a (seed, step) draw)."""
    picked = [rows[i] for i in batch_indices(len(rows), cfg.prompts_per_step, step, cfg.seed)]
    share = cfg.prompts_per_step // world
    return picked[rank * share:(rank + 1) * share]


def _per_completion(picked: list[PromptRow], G: int) -> tuple[list, dict[str, list]]:
    """Prompts and columns with one entry per completion, as rewards take them (each prompt's G times)."""
    prompts = [r.messages for r in picked for _ in range(G)]                       # N
    names = sorted({k for r in picked for k in r.columns})
    return prompts, {k: [r.columns.get(k) for r in picked for _ in range(G)] for k in names}


def _router_mask(out, micro: Trajectory) -> torch.Tensor:
    """[tokens] 1 on the real tokens of `out.router_logits`' rows (the shared-prompt forward lays them out itself)."""
    return out.router_mask if out.router_mask is not None else micro.attention_mask.reshape(-1)


def _micro_loss(model, micro: Trajectory, den: torch.Tensor, cfg: GRPOConfig, settings: LossSettings,
                forward: PolicyForward, router):
    """One micro-batch's share of the minibatch loss (numerator / the minibatch's global denominator), its
    balance loss, per-token statistics, and the forward's output."""
    out = forward(model, micro, with_entropy=True, router_logits=router is not None)
    old = micro.old_logprobs if micro.old_logprobs is not None else out.logprobs.detach()   # [n, C]
    loss, tok = grpo_loss(out.logprobs, old, micro.ref_logprobs, micro.advantages, micro.loss_mask, settings,
                          weights=tis_weights(old, micro.sampling_logprobs, cfg.tis_cap), denominator=den,
                          with_stats=True)
    balance = torch.zeros((), device=loss.device)
    if router is not None and cfg.balance_alpha > 0:
        balance = router.balance_loss(out.router_logits, cfg.balance_alpha, _router_mask(out, micro))
    return loss, balance, {**tok, "old": old}, out


STAT_KEYS = ("loss/policy", "loss/kl", "loss/clip_frac", "loss/balance", "policy/entropy", "policy/ratio",
             "train/grad_norm", "rollout/logprob_gap", "rollout/kl_sampler", "rollout/tis_clip_frac")


def _update(run: Run, traj: Trajectory, cfg: GRPOConfig, forward: PolicyForward, gen: torch.Generator,
            step: int, settings: LossSettings | None = None) -> dict[str, float]:
    """μ epochs x minibatches optimizer steps over one trajectory (`settings`: the run's loss settings, built once;
    default from `cfg`); statistics averaged over the updates, and the expert load of the last micro-batch."""
    model, accelerator = run.model, run.accelerator
    settings = settings or cfg.loss_settings()
    stats: dict[str, list[float]] = {k: [] for k in STAT_KEYS}
    skipped, load = 0, {}
    groups = [(traj.group == g).nonzero().squeeze(1) for g in torch.unique_consecutive(traj.group)]  # rows per prompt
    for epoch in range(cfg.inner_epochs):
        order = torch.randperm(len(groups), generator=gen)                             # rows stay in their groups
        for chunk in order.chunk(min(cfg.minibatches, len(order))):
            rows = torch.cat([groups[g] for g in chunk.tolist()])                      # [rows of whole groups]
            # the loss is normalised by the global count (all processes); data-parallel gradients are averaged
            # over processes, hence x world: the update equals one process taking the whole global batch
            den = loss_denominator(traj.loss_mask[rows], settings.aggregation, settings.max_tokens)
            den = accelerator.reduce(den, reduction="sum").clamp_min(1) / accelerator.num_processes
            micros = rows.split(forward.micro_batch)
            minibatch_loss = 0.0
            for i, idx in enumerate(micros):
                micro = traj[idx]
                sync = accelerator.no_sync(model) if i < len(micros) - 1 else contextlib.nullcontext()
                with sync:  # gradients are all-reduced once per minibatch, at its last micro-batch
                    loss, balance, tok, out = _micro_loss(model, micro, den, cfg, settings, forward, run.router)
                    accelerator.backward(loss + balance * len(idx) / len(rows))
                m = micro.loss_mask.bool()
                if m.any():
                    if micro.ref_logprobs is not None:  # with β = 0 nothing is measured, and nothing is logged
                        stats["loss/kl"].append(tok["kl"][m].mean().item())
                    stats["loss/clip_frac"].append(tok["clipped"][m].float().mean().item())
                    stats["policy/ratio"].append(tok["ratio"][m].mean().item())
                    stats["policy/entropy"].append(out.entropy[m].mean().item())
                    if epoch == 0:  # engine's sampling log-probs vs the trainer's π_θold
                        for k, v in mismatch_stats(tok["old"], micro.sampling_logprobs, m, cfg.tis_cap).items():
                            stats[k].append(v)
                minibatch_loss += loss.item()
                stats["loss/balance"].append(balance.item())
                if run.router is not None:
                    load = run.router.load(out.router_logits, _router_mask(out, micro))
            stats["loss/policy"].append(minibatch_loss)
            applied, grad_norm = run.apply(step, {"loss/policy": minibatch_loss})
            stats["train/grad_norm"].append(grad_norm)
            skipped += not applied
    # loss/kl is absent with β = 0 (nothing measured); other empty lists (no token counted) are NaN
    averaged = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items() if v or k != "loss/kl"}
    return {**averaged, "train/skipped_nonfinite": float(skipped), **load}


def _fresh_routes(model, traj: Trajectory, forward: PolicyForward) -> torch.Tensor:
    """[N, P+C, L, k] the routes `model` chooses itself (no replay) on the trajectory."""
    return forward.no_grad(model, dataclasses.replace(traj, routes=None), record_routes=True)[1]


def _routing_metrics(model, traj: Trajectory, forward: PolicyForward, reference: Reference,
                     before: torch.Tensor) -> dict[str, float]:
    """Agreement of top-k expert sets (share of tokens, mean over MoE layers) on the positions whose outputs
    predict completion tokens, every model routing afresh:

        routing/update_agreement   the policy after the step's last update vs at its start
        routing/ref_agreement      the policy after the update vs π_ref
        routing/sampler_agreement  the policy at the step's start vs the engine while sampling (when recorded)
    """
    from ..model.routing import agreement

    P = traj.input_ids.shape[1] - traj.completion_len
    where = torch.zeros(traj.input_ids.shape, device=traj.input_ids.device)            # [N, P+C]
    where[:, P - 1:-1] = traj.loss_mask
    after = _fresh_routes(model, traj, forward)
    out = {"routing/update_agreement": agreement(after, before, where)}
    _, ref_routes = reference.logprobs(model, dataclasses.replace(traj, routes=None), forward, record_routes=True)
    if ref_routes is not None:
        out["routing/ref_agreement"] = agreement(after, ref_routes, where)
    if traj.sampler_routes is not None:
        out["routing/sampler_agreement"] = agreement(before, traj.sampler_routes.to(before.device), where)
    return out


def _mean_over_processes(metrics: dict[str, float], world: int) -> dict[str, float]:
    """Each metric averaged over the processes that report it (every process logs its own share of the batch)."""
    if world == 1:
        return metrics
    import torch.distributed as dist

    every: list[dict] = [None] * world
    dist.all_gather_object(every, metrics)
    keys = sorted({k for m in every for k in m})
    return {k: sum(m[k] for m in every if k in m) / sum(k in m for m in every) for k in keys}


def combine_rewards(scores: Scores, specs: list, mode: str, group_size: int) -> Scores:
    """reward_mode `normalize`: the total becomes Σ_k c_k z_k (core.normalized_total), and the raw Σ_k c_k r_k is
    logged beside it as reward/weighted (the normalised total is centred in every group); `sum`: as scored."""
    if mode == "sum":
        return scores
    weights = {s.key: s.weight for s in specs}
    raw = weighted_sum(scores.components, weights)
    raw = raw[~raw.isnan()]
    extra = {k: v for k, v in scores.extra.items() if k != "reward/partially_scored"}  # z = 0 stands in for None
    extra["reward/weighted"] = raw.mean().item() if raw.numel() else float("nan")
    return dataclasses.replace(scores, total=normalized_total(scores.components, weights, group_size), extra=extra)


def _check_skipped(run: Run, scores, cfg: GRPOConfig, step: int, streak: int) -> int:
    """With on_reward_error=skip: say which reward failed on how many groups this step, and stop (RewardError
    naming the reward and its last error) after `max_skipped_steps` consecutive steps that skipped every group
    of every process. Returns the new streak of such steps."""
    if cfg.on_reward_error != "skip":
        return 0
    kept = run.accelerator.reduce(scores.keep.any().float().to(run.device), reduction="sum").item()
    streak = streak + 1 if kept == 0 else 0
    if scores.errors and run.is_main:
        skipped = int(scores.extra.get("reward/skipped_groups", 0))
        for name, error in scores.errors.items():
            print(f"grpo: step {step}: reward '{name}' failed, {skipped} of {len(scores.keep) // cfg.group_size} "
                  f"prompt groups skipped on this process: {error}", flush=True)
    if cfg.max_skipped_steps and streak >= cfg.max_skipped_steps:
        last = "; ".join(f"reward '{k}': {v}" for k, v in scores.errors.items()) or "no error recorded"
        raise RewardError(f"every prompt group of the last {streak} steps was skipped (on_reward_error=skip, "
                          f"max_skipped_steps={cfg.max_skipped_steps}): nothing trained; last error: {last}")
    return streak


def _prompt_tokens(tokenizer, row: PromptRow, tools: list[dict] | None = None) -> int:
    """The prompt's length as sampled (tools.protocol=chat: with the tools the template lists)."""
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True, **extra)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_prompt(tokenizer, row: PromptRow, budget: int, tools: list[dict] | None = None) -> PromptRow | None:
    """`row` cut from the left to at most `budget` prompt tokens (`_prompt_tokens`): its earliest messages left out
    while the later ones alone are still over, then the first message kept cut to the last tokens of its content that
    fit (a message with tool calls is not cut: left out whole). None when not even an empty last message fits (the
    template's own tokens are over the budget)."""
    msgs = list(row.messages)

    def fits(messages: list[dict]) -> bool:
        return _prompt_tokens(tokenizer, PromptRow(messages, row.columns), tools) <= budget

    while len(msgs) > 1 and not fits(msgs[1:]):
        msgs = msgs[1:]
    if fits(msgs):
        return PromptRow(msgs, row.columns)
    first, rest = msgs[0], msgs[1:]
    ids = tokenizer(first["content"], add_special_tokens=False)["input_ids"]
    if first.get("tool_calls") or not ids:
        return PromptRow(rest, row.columns) if rest and fits(rest) else None

    def cut(k: int) -> list[dict]:  # the first message without its first k content tokens
        return [{**first, "content": tokenizer.decode(ids[k:])}] + rest

    lo, hi = 1, len(ids)  # fewest tokens to cut: fits(cut(hi)) may still fail (an empty content) when rest is over
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(cut(mid)) else (mid + 1, hi)
    if lo < len(ids) and fits(cut(lo)):
        return PromptRow(cut(lo), row.columns)
    return PromptRow(rest, row.columns) if rest and fits(rest) else None


MEASURED_PROMPTS = 100_000  # prompts whose token length is checked before the run (~60 µs each on a CPU core)


def _measured_tokens(tokenizer, r: PromptRow, tools: list[dict] | None) -> int:
    """The prompt's tokens, its tool messages checked to render (DataError naming the row)."""
    try:
        check_tools_rendered(tokenizer, r.messages)
    except DataError as e:
        raise DataError(f"{r.columns['row']}: {e}") from None
    return _prompt_tokens(tokenizer, r, tools)


def _prompt_fits(tokenizer, r: PromptRow, cfg: GRPOConfig, context: int | None, tools: list[dict] | None) -> int:
    """The prompt's tokens + sampling.max_new_tokens; ConfigError naming the row when that exceeds the context
    (overlong_prompts=refuse, checked per step where the prompts were not measured up front)."""
    n = _measured_tokens(tokenizer, r, tools)
    if context and n + cfg.sampling.max_new_tokens > context:
        raise ConfigError(f"{r.columns['row']}: prompt of {n} tokens + sampling.max_new_tokens="
                          f"{cfg.sampling.max_new_tokens} exceeds the model's context of {context} tokens "
                          f"(overlong_prompts=refuse; drop or truncate take such prompts out or cut them)")
    return n + cfg.sampling.max_new_tokens


def _fit_prompts(cfg: GRPOConfig, tokenizer, rows, context: int | None,
                 tools: list[dict] | None) -> tuple[list[PromptRow], dict[str, int], int]:
    """The training prompts that fit the model's context with sampling.max_new_tokens, as `overlong_prompts` says
    (refuse: ConfigError naming the first row over; drop; truncate), how many were dropped / truncated, and the
    longest kept prompt's tokens. `rows` itself is returned where every prompt fits (a lazy view stays lazy)."""
    budget = context - cfg.sampling.max_new_tokens if context else None
    kept, counts, longest = [], {"data/prompts_dropped": 0, "data/prompts_truncated": 0}, 0
    for r in rows:
        n = _measured_tokens(tokenizer, r, tools)
        if budget is None or n <= budget:
            kept.append(r)
            longest = max(longest, n)
            continue
        over = (f"{r.columns['row']}: prompt of {n} tokens + sampling.max_new_tokens={cfg.sampling.max_new_tokens} "
                f"exceeds the model's context of {context} tokens")
        if cfg.overlong_prompts == "refuse":
            raise ConfigError(f"{over} (overlong_prompts=refuse; drop or truncate take such prompts out or cut them)")
        cut = truncate_prompt(tokenizer, r, budget, tools) if cfg.overlong_prompts == "truncate" else None
        if cfg.overlong_prompts == "truncate" and cut is None:
            raise ConfigError(f"{over}, and cannot be cut to fit: sampling.max_new_tokens leaves too little room")
        if cut is None:
            counts["data/prompts_dropped"] += 1
        else:
            counts["data/prompts_truncated"] += 1
            kept.append(cut)
            longest = max(longest, _prompt_tokens(tokenizer, cut, tools))
    if not any(counts.values()):
        return rows, counts, longest
    if not kept:
        raise ConfigError(f"every one of the {len(rows)} training prompts is over the model's context of {context} "
                          f"tokens with sampling.max_new_tokens={cfg.sampling.max_new_tokens} "
                          f"(overlong_prompts={cfg.overlong_prompts}): nothing to train on")
    return kept, counts, longest


def _checked_inputs(cfg: GRPOConfig, world: int):
    """Tokenizer, train prompts (read as drawn: `align.run.data.RowView`), eval prompts, the longest sequence the run
    generates (its longest prompt plus the most new tokens, at most the model's context: what vLLM sizes its KV cache
    for), the over-long prompts dropped / truncated (`overlong_prompts`) and whether the train prompts' lengths were
    measured: everything bad input can break, checked before anything is written. One streaming pass validates every
    train row and its reward columns; every prompt is measured too where the engine sizes itself by them, where there
    are at most MEASURED_PROMPTS, or where overlong_prompts drops or truncates (else each step's prompts are measured
    when drawn, `_prompt_fits`: tokenising 2 million prompts takes minutes)."""
    model_json = check_model_dir(cfg.model.path, policy=True)
    context = model_json.get("max_position_embeddings")
    for key, used in (("routing_replay", cfg.routing_replay != "none"), ("freeze_router", cfg.freeze_router)):
        if used and model_json.get("model_type") != "deepseek_v2":
            raise ConfigError(f"key '{key}': {cfg.model.path} is {model_json.get('model_type')!r}, not a DeepSeek-V2 "
                              "MoE model (it has no router)")
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.chat_template)
    train_rows = prompt_rows(cfg.train_data)
    measured = (engine_class(cfg.rollout.engine).sized_by_prompts or len(train_rows) <= MEASURED_PROMPTS
                or cfg.overlong_prompts != "refuse")
    tools = toolbox(cfg.tools).schemas() if cfg.tools.protocol == "chat" else None
    # check_columns over all rows finds, for each column, the first row without it: the first row, and each row that
    # is the first to lack a column, are the rows it needs to see to find the same
    witnesses, known, lacking = [], set(), set()
    for i, r in enumerate(train_rows):
        known.update(r.columns)
        lacks = {k for k in known - lacking if r.columns.get(k) is None}
        if i == 0 or lacks:
            witnesses.append(r.columns)
            lacking |= lacks
    overlong = {"data/prompts_dropped": 0, "data/prompts_truncated": 0}
    longest = context or 0
    if measured:
        train_rows, overlong, longest = _fit_prompts(cfg, tokenizer, train_rows, context, tools)
        longest += cfg.sampling.max_new_tokens
    eval_rows = [r for path in cfg.eval_data for r in load_prompts(path)]
    for r in eval_rows:
        if r.columns.get("answer") is None:
            raise ConfigError(f"{r.columns['row']}: eval_data rows need an 'answer' column for held-out accuracy")
        longest = max(longest, _prompt_tokens(tokenizer, r) + cfg.eval_max_new_tokens)
    try:
        check_columns(cfg.rewards, witnesses)
    except RewardError as e:
        raise ConfigError(str(e)) from None
    if cfg.prompts_per_step % world:
        raise ConfigError(f"key 'prompts_per_step' must be a multiple of the {world} processes (each takes an "
                          f"equal share of the prompts), got {cfg.prompts_per_step}")
    if cfg.minibatches > cfg.prompts_per_step // world:
        raise ConfigError(f"key 'minibatches' must be at most the {cfg.prompts_per_step // world} prompt groups "
                          f"each of the {world} processes holds (a minibatch holds whole groups), got "
                          f"{cfg.minibatches}")
    return tokenizer, train_rows, eval_rows, min(longest, context) if context else longest, overlong, measured


def _engine(cfg: GRPOConfig, run: Run, tokenizer, max_len: int) -> RolloutEngine:
    """The rollout engine (align/rollout/engines.py); it records the MoE routes it samples with for
    routing_replay=rollout, and for the routing metrics where that costs nothing."""
    cheap = engine_class(cfg.rollout.engine).cheap_routes
    record_routes = run.router is not None and (cfg.routing_replay == "rollout" or (
        cfg.routing_metrics_every > 0 and cheap))
    ctx = EngineContext(model=run.accelerator.unwrap_model(run.model), model_path=str(model_dir(cfg.model.path)),
                        tokenizer=tokenizer, dtype=run.precision.compute, device=run.device,
                        seed=cfg.seed + run.accelerator.process_index, max_model_len=max_len,
                        processes=run.accelerator.num_processes, record_routes=record_routes, step=run.start,
                        output_dir=cfg.output_dir)
    return make_engine(cfg.rollout, ctx)


def train_grpo(cfg: GRPOConfig) -> dict:
    """Run GRPO to `cfg.steps` (resuming from the newest checkpoint in output_dir); returns a summary."""
    world = world_size()
    tokenizer, train_rows, eval_rows, max_len, overlong, measured = _checked_inputs(cfg, world)
    context = None if measured else check_model_dir(cfg.model.path).get("max_position_embeddings")
    tools_schemas = toolbox(cfg.tools).schemas() if cfg.tools.protocol == "chat" and not measured else None
    uses_routes = cfg.routing_replay != "none" or cfg.routing_metrics_every > 0
    if uses_routes and check_model_dir(cfg.model.path).get("model_type") == "deepseek_v2" and not fastpaths.active(
            "moe_routes"):  # the installed transformers' MoE gate is not what align.model.routing hooks (one warning)
        cfg = dataclasses.replace(cfg, routing_replay="none", routing_metrics_every=0)
    run = start_run(cfg, "grpo", total_updates=cfg.steps * cfg.inner_epochs * cfg.minibatches,
                    warmup_steps=cfg.warmup_steps, seed_per_process=True)
    rank, device, G = run.accelerator.process_index, run.device, cfg.group_size  # G samples asked of the engine
    reference = Reference(cfg.model, cfg.beta, device, cfg.ref_offload)
    engine = _engine(cfg, run, tokenizer, max_len)
    forward = PolicyForward.of(cfg)
    loss_settings = cfg.loss_settings()  # fixed for the run
    needs_old = cfg.inner_epochs > 1 or cfg.minibatches > 1  # else π_θold is the update's own forward, detached
    history = dict(run.state.get("history", {}))
    skipped_streak = 0  # consecutive steps whose every prompt group a failing reward skipped
    if run.is_main:
        print(f"grpo: {len(train_rows)} prompts, {cfg.steps} steps of {cfg.prompts_per_step} x G={G}"
              f"{f' over {world} processes' if world > 1 else ''}, "
              f"{'resuming at step ' + str(run.start) if run.resumed else 'new run'}", flush=True)
    tools = ToolRollouts(engine, tokenizer, cfg.tools, toolbox(cfg.tools), cfg.model.path) if (
        cfg.tools.enabled) else None  # multi-turn rollouts with tools (align/rollout/multiturn.py); held-out too
    sample = tools or (lambda rows, n, sampling: engine.generate([r.messages for r in rows], n=n, sampling=sampling))
    if any(overlong.values()) and run.is_main:
        read = len(train_rows) + overlong["data/prompts_dropped"]
        print(f"grpo: overlong_prompts={cfg.overlong_prompts}: of {read} training prompts, "
              f"{overlong['data/prompts_dropped']} dropped and {overlong['data/prompts_truncated']} truncated (over "
              f"the model's context with sampling.max_new_tokens={cfg.sampling.max_new_tokens})", flush=True)
    if any(overlong.values()) and run.start == 0:
        run.log.log(0, overlong, echo=False)
    if eval_rows and run.start == 0:
        history["accuracy_start"] = accuracy(engine, eval_rows, cfg.eval_max_new_tokens, sample=tools)["accuracy"]
        run.log.log(0, {"eval/accuracy": history["accuracy_start"]})

    lag = cfg.rollout.max_off_policy_steps  # L > 0: a producer samples up to L versions ahead (grpo/ahead.py)
    ahead = RolloutsAhead(engine, lambda s: _step_prompts(train_rows, cfg, s, rank, world), run.start, cfg.steps,
                          lag, G, cfg.sampling, sample) if lag > 0 else None
    for step in run.steps(cfg.steps):  # a SIGTERM stops between two steps, checkpointed (align/run/stop.py)
        t0 = time.time()
        # 1. rollouts: G completions per prompt from the current policy (or, ahead, from one at most L versions old)
        if ahead is None:
            picked = _step_prompts(train_rows, cfg, step, rank, world)
            for r in picked if not measured else ():  # lengths not checked up front (MEASURED_PROMPTS)
                _prompt_fits(tokenizer, r, cfg, context, tools_schemas)
            with offloaded(run.model, run.optimizer, enabled=cfg.rollout.offload_policy and engine.own_weights):
                rollouts = sample(picked, G, cfg.sampling)  # one turn, or turns and tool calls (tools.protocol)
        else:
            batch, ahead_metrics = ahead.take(step)
            picked, rollouts = batch.picked, batch.rollouts
        fault_point("generation", step + 1)
        t_gen = time.time()
        # 2. rewards, per component and weighted total (NaN: no reward scored the completion)
        n = rollouts.group_size  # from here on G is what the engine returned
        prompts, columns = _per_completion(picked, n)
        columns.update(rollouts.columns or {})  # what the rollout made per completion (its environments)
        scores = combine_rewards(score(cfg.rewards, prompts, rollouts.completions, columns, columns["row"], n,
                                       cfg.on_reward_error), cfg.rewards, cfg.reward_mode, n)
        skipped_streak = _check_skipped(run, scores, cfg, step + 1, skipped_streak)
        if ahead is not None:  # groups sampled by a policy more than L versions old are dropped (none should be)
            stale = ahead_metrics["rollout/staleness"] > lag
            ahead_metrics["rollout/stale_dropped"] = float(scores.keep.sum().item() // n if stale else 0)
            if stale:
                scores.keep[:] = False
        fault_point("scoring", step + 1)
        t_reward = time.time()
        kept = scores.total[scores.keep]
        rewards_ok = check_step("grpo", step + 1, {"reward/total": kept[~kept.isnan()].sum().item()},
                                cfg.on_nonfinite)
        # 3. the trajectory: group-normalised advantages, loss mask, groups dropped (skipped / zero-std)
        traj, zero = build_trajectory(rollouts, scores.total, scores.components, scores.keep,
                                      scale=cfg.scale_rewards, drop_zero_std=cfg.drop_zero_std_groups,
                                      mask_truncated=cfg.mask_truncated, drop_rows=world == 1,
                                      replay_sampler_routes=cfg.routing_replay == "rollout")
        if cfg.log_completions and run.is_main:  # what the policy wrote (samples.jsonl)
            write_samples(cfg.output_dir, sample_rows(step + 1, prompts, rollouts, scores.total, scores.components,
                                                      group_advantages(scores.total, n, cfg.scale_rewards),
                                                      cfg.log_completions), run.log.tensorboard, run.log.wandb)
        metrics = {**scores.metrics(), "reward/zero_std_frac": zero.float().mean().item(),
                   "rollout/completion_len": rollouts.loss_mask.sum(1).float().mean().item(),
                   "rollout/truncated_frac": rollouts.truncated.float().mean().item(), **(rollouts.tool_stats or {})}
        if len(traj) > 0 and rewards_ok:  # on_nonfinite=skip: a bad step trains on nothing
            traj = traj.to(device)
            every = cfg.routing_metrics_every
            measure = run.router is not None and every > 0 and (step + 1) % every == 0
            before = _fresh_routes(run.model, traj, forward) if measure else None
            # 4. old (only when the policy moves between minibatches) and reference log-probs, no grad; with
            # routing_replay=old the old forward's routes are replayed from here on
            if needs_old:
                traj.old_logprobs, old_routes = forward.no_grad(run.model, traj, cfg.routing_replay == "old")
                traj.routes = old_routes if cfg.routing_replay == "old" else traj.routes
            ref_traj = traj if cfg.replay_reference else dataclasses.replace(traj, routes=None)
            traj.ref_logprobs, _ = reference.logprobs(run.model, ref_traj, forward)
            t_ref = time.time()
            # 5. μ epochs x minibatches of updates on grpo_loss
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)  # minibatch order: a function of step
            metrics.update(_update(run, traj, cfg, forward, gen, step + 1, loss_settings))
            fault_point("update", step + 1)
            if measure:
                metrics.update(_routing_metrics(run.model, traj, forward, reference, before))
            metrics.update({"perf/ref_s": t_ref - t_reward, "perf/update_s": time.time() - t_ref})
        # 6. weight sync to the rollout engine
        engine.sync_weights(run.model)
        if ahead is not None:
            ahead.synced(step + 1)
            metrics.update(ahead_metrics)
        # 7. metrics, held-out accuracy, checkpoint
        metrics.update(engine.sync_metrics)
        metrics.update({"perf/generate_s": t_gen - t0, "perf/sync_s": engine.last_sync_s,
                        "perf/reward_s": t_reward - t_gen, "perf/step_s": time.time() - t0,
                        "train/lr": run.scheduler.get_last_lr()[0]})
        done = step + 1
        if eval_rows and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            history["accuracy_last"] = metrics["eval/accuracy"] = accuracy(
                engine, eval_rows, cfg.eval_max_new_tokens, sample=tools)["accuracy"]
        run.log.log(done, _mean_over_processes(metrics, world))
        run.save(done, cfg.steps, tokenizer, {"history": history})
    if ahead is not None:
        ahead.close()
    if tools is not None:
        tools.close()
    engine.close()
    final = run.finish(tokenizer)
    close_rewards(cfg.rewards)
    summary = {"final": str(final), "steps": cfg.steps, "report": run.report and str(run.report), **history,
               **{k.removeprefix("data/"): v for k, v in overlong.items() if v}}
    if "accuracy_start" in history and "accuracy_last" in history and run.is_main:
        print(f"grpo: held-out accuracy {history['accuracy_start']:.1%} -> {history['accuracy_last']:.1%}",
              flush=True)
    return summary
