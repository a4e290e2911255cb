"""`align sft`: supervised fine-tuning on chats, loss on assistant tokens only (DeepSeek-V2 §4.1).

    loss = Σ_{assistant tokens} −log π_θ(x_t | x_<t) / (number of assistant tokens in the global batch)
           + α · Σ_{MoE layers} Σ_i f_i P_i                                       (expert-level balance loss, align.moe)

The paper fine-tunes with lr 5e-6 for 2 epochs: those are the defaults. AdamW, linear warmup then cosine decay,
gradient accumulation and clipping, optional packing (several chats per row, attention kept within each chat through
restarting position ids), held-out loss at the start, every `eval_every` steps and at the end.

Runs as one CPU process, or on several GPUs under `accelerate launch` with no code change: each process takes its
slice of every global batch. Data order is a pure function of (seed, step), so a resumed run sees exactly the
batches an uninterrupted one would. Checkpoints are atomic HF directories (adapter only with LoRA); the final model
goes to OUTPUT/final (merged, with LoRA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .allocator import keep_freed_memory
from .config import ConfigError, config_to_dict, option, require
from .data import IGNORE, batch_indices, collate, collate_packed, load_chats, pack, tokenize_chats
from .finite import NonFinitePolicy, check_step, nonfinite_option
from .logprobs import forward_logprobs
from .metrics import MetricsLogger, progress
from .moe import expert_balance_loss, expert_load, routing_kwargs
from .optim import build_optimizer, warmup_cosine
from .policy import ModelConfig, check_model_dir, is_deepseek_v2, load_for_training, load_tokenizer
from .rundir import ResumeMode, claim_all, resume_option


@dataclasses.dataclass
class SFTConfig:
    model: ModelConfig = option(help="The policy to fine-tune (model.path, dtype, LoRA, ...).")
    output_dir: str = option(help="Run directory: checkpoints/, final/, metrics.jsonl.")
    train_data: list[str] = option(help="Training files (.jsonl/.json/.parquet or save_to_disk dirs).")
    eval_data: list[str] = option(factory=list, help="Held-out files for the periodic held-out loss.")
    max_length: int = option(512, help="Tokens per chat (longer chats are truncated; counted in the log).")
    packing: bool = option(False, help="Pack several chats into each row of max_length tokens.")
    epochs: float = option(2.0, help="Passes over the training data (the paper: 2).")
    max_steps: int = option(0, help="Stop after this many optimizer steps (0: derived from epochs).")
    batch_size: int = option(8, help="Rows per micro-batch per process.")
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    lr: float = option(5e-6, help="Peak learning rate (the paper: 5e-6).")
    weight_decay: float = option(0.0, help="AdamW weight decay on matrices.")
    warmup_ratio: float = option(0.03, help="Share of the steps with linear warmup.")
    min_lr_ratio: float = option(0.0, help="Final lr as a share of the peak (cosine decay).")
    max_grad_norm: float = option(1.0, help="Gradient clipping norm (0: off).")
    balance_alpha: float = option(0.003, help="α of the expert-level balance loss (DeepSeek-V2: 0.003; 0: off).")
    eval_every: int = option(50, help="Steps between held-out evaluations (0: start and end only).")
    save_every: int = option(100, help="Steps between checkpoints (0: only at the end).")
    keep_last: int = option(2, help="Checkpoints kept (0: all).")
    log_every: int = option(10, help="Steps between console log lines.")
    logprob_chunk: int = option(1024, help="Tokens per LM-head chunk (logits are never materialised in full).")
    tensorboard: bool = option(True, help="Also write TensorBoard event files (when tensorboard is installed).")
    seed: int = option(0, help="Seed for data order and initialisation.")
    resume: ResumeMode = resume_option()
    on_nonfinite: NonFinitePolicy = nonfinite_option("loss or gradient norm")

    def validate(self) -> None:
        self.model.validate()
        require(bool(self.train_data), "train_data", "at least one file", self.train_data)
        for key in ("max_length", "batch_size", "grad_accum", "logprob_chunk"):
            require(getattr(self, key) > 0, key, "a positive integer", getattr(self, key))
        require(self.epochs > 0 or self.max_steps > 0, "epochs", "positive (or max_steps > 0)", self.epochs)
        require(self.max_steps >= 0, "max_steps", ">= 0", self.max_steps)
        require(self.lr > 0, "lr", "positive", self.lr)
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", self.warmup_ratio)
        require(self.balance_alpha >= 0, "balance_alpha", ">= 0", self.balance_alpha)
        for key in ("eval_every", "save_every", "keep_last", "max_grad_norm"):
            require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))


def _prepare_data(cfg: SFTConfig, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """Load, validate and tokenise everything (before anything is written)."""
    train, stats = [], {"rows": 0, "truncated": 0, "dropped": 0}
    for path in cfg.train_data:
        ex, s = tokenize_chats(tokenizer, load_chats(path), cfg.max_length, str(path))
        train += ex
        stats = {k: stats[k] + s[k] for k in stats}
    held = []
    for path in cfg.eval_data:
        held += tokenize_chats(tokenizer, load_chats(path), cfg.max_length, str(path))[0]
    if cfg.packing:
        train = pack(train, cfg.max_length, tokenizer.pad_token_id)
    return train, held, stats


def _to_batch(rows: list[dict], packing: bool, pad_id: int, device) -> dict[str, torch.Tensor]:
    batch = collate_packed(rows, pad_id) if packing else collate(rows, pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def _nll_sum(model, batch: dict, cfg: SFTConfig, moe: dict | None):
    """Summed NLL over labelled tokens, their count, balance loss, router logits of one micro-batch."""
    ids = batch["input_ids"]                                                        # [B, T]
    out = forward_logprobs(model, ids, ids.shape[1] - 1, attention_mask=batch.get("attention_mask"),
                           position_ids=batch.get("position_ids"), chunk_tokens=cfg.logprob_chunk,
                           router_logits=moe is not None)
    labels = batch["labels"][:, 1:]                                                 # [B, T-1]
    mask = (labels != IGNORE).float()                                               # [B, T-1]
    nll = -(out.logprobs * mask).sum()
    balance = torch.zeros((), device=ids.device)
    if moe is not None and cfg.balance_alpha > 0:
        token_mask = batch["attention_mask"].reshape(-1) if "attention_mask" in batch else None
        balance = expert_balance_loss(out.router_logits, moe["top_k"], cfg.balance_alpha, token_mask,
                                      **moe["routing"])
    return nll, mask.sum(), balance, out.router_logits


@torch.no_grad()
def heldout_loss(model, rows: list[dict], cfg: SFTConfig, pad_id: int, device) -> float:
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(rows), cfg.batch_size):
        nll, n, _, _ = _nll_sum(model, _to_batch(rows[i:i + cfg.batch_size], False, pad_id, device), cfg, None)
        total, count = total + nll.item(), count + n.item()
    model.train()
    return total / max(count, 1.0)


def train_sft(cfg: SFTConfig) -> dict:
    """Run SFT to the end (resuming from the newest checkpoint in output_dir); returns a summary."""
    keep_freed_memory()  # the process reuses freed activations instead of faulting them in again
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # -- everything that can fail on bad input happens before the first write
    context = check_model_dir(cfg.model.path).get("max_position_embeddings")
    if context and cfg.max_length > context:
        raise ConfigError(f"key 'max_length' is {cfg.max_length}, beyond the model's context of {context} tokens")
    tokenizer = load_tokenizer(cfg.model.path)
    train_rows, held_rows, data_stats = _prepare_data(cfg, tokenizer)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU: gloo across processes
    set_seed(cfg.seed)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = max(1, len(train_rows) // global_batch)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    claim_all(accelerator, cfg.output_dir, "sft", cfg)  # before any write: the directory is this run's
    resume = ckpt.latest_checkpoint(cfg.output_dir)
    model = load_for_training(cfg.model, device, resume)
    moe = None
    if is_deepseek_v2(model.config):
        moe = {"top_k": model.config.num_experts_per_tok, "routing": routing_kwargs(model.config)}
    elif cfg.balance_alpha > 0:
        raise ConfigError(f"balance_alpha={cfg.balance_alpha} needs a DeepSeek-V2 MoE model; {cfg.model.path} is "
                          f"{model.config.model_type!r} (set balance_alpha=0)")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, total_steps, int(cfg.warmup_ratio * total_steps), cfg.min_lr_ratio)
    start_step, best = 0, {}
    if resume is not None:
        state = ckpt.load_training_state(resume, optimizer, scheduler)
        start_step, best = state["step"], state.get("heldout", {})
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    log = MetricsLogger(cfg.output_dir, enabled=accelerator.is_main_process, tensorboard=cfg.tensorboard,
                        prefix="sft ")
    log.truncate_after(start_step)
    pad_id = tokenizer.pad_token_id
    if accelerator.is_main_process:
        where = f"resuming at step {start_step}" if resume else "new run"
        print(f"sft: {len(train_rows)} rows ({data_stats['truncated']} truncated, {data_stats['dropped']} dropped), "
              f"{total_steps} steps of {global_batch}, {where}", flush=True)

    heldout = dict(best)
    if held_rows and start_step == 0:
        heldout["start"] = heldout_loss(model, held_rows, cfg, pad_id, device)
        log.log(0, {"eval/loss": heldout["start"]})
    t0 = time.time()
    skipped = 0
    steps = range(start_step, total_steps)
    for step in progress(steps, total_steps, start_step, "sft", accelerator.is_main_process):
        # -- this process's micro-batches of global batch `step`
        idx = batch_indices(len(train_rows), global_batch, step, cfg.seed)
        mine = idx[rank * cfg.batch_size * cfg.grad_accum:(rank + 1) * cfg.batch_size * cfg.grad_accum]
        micro = [_to_batch([train_rows[i] for i in mine[m * cfg.batch_size:(m + 1) * cfg.batch_size]],
                           cfg.packing, pad_id, device) for m in range(cfg.grad_accum)]
        n_tokens = sum((mb["labels"][:, 1:] != IGNORE).sum() for mb in micro).float()
        n_tokens = accelerator.reduce(n_tokens, reduction="sum").clamp_min(1.0)
        # -- loss = token-mean NLL over the global batch (+ balance loss), accumulated over micro-batches
        loss_sum, balance_sum, router = 0.0, 0.0, []
        for m, mb in enumerate(micro):
            sync = contextlib.nullcontext() if m == len(micro) - 1 else accelerator.no_sync(model)
            with sync:
                nll, _, balance, router_logits = _nll_sum(model, mb, cfg, moe)
                loss = nll * world / n_tokens + balance / len(micro)
                accelerator.backward(loss)
            loss_sum += nll.item() / n_tokens.item() * world
            balance_sum += balance.item() / len(micro)
            router = router_logits
        if world > 1:  # each process summed its share of the global token mean: add the shares up
            shares = accelerator.reduce(torch.tensor([loss_sum, balance_sum], device=device), reduction="sum")
            loss_sum, balance_sum = shares[0].item() / world, shares[1].item() / world
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        if check_step("sft", step + 1, {"loss/sft": loss_sum, "loss/balance": balance_sum,
                                        "train/grad_norm": None if grad_norm is None else float(grad_norm)},
                      cfg.on_nonfinite):
            optimizer.step()
            scheduler.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        # -- metrics, evaluation, checkpoint
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)  # None: DeepSpeed clips in its step
        metrics = {"loss/sft": loss_sum, "loss/balance": balance_sum, "train/grad_norm": grad_norm,
                   "train/lr": scheduler.get_last_lr()[0], "train/tokens": int(n_tokens.item()),
                   "perf/sec_per_step": (time.time() - t0) / (done - start_step), "train/skipped_nonfinite": skipped}
        if moe is not None:
            last = micro[-1].get("attention_mask")
            token_mask = last.reshape(-1) if last is not None else None
            metrics.update(expert_load(router, moe["top_k"], token_mask, **moe["routing"]))
        if held_rows and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
            heldout["last"] = metrics["eval/loss"] = heldout_loss(model, held_rows, cfg, pad_id, device)
        log.log(done, metrics, echo=(done % cfg.log_every == 0 or done == total_steps or "eval/loss" in metrics))
        if (cfg.save_every and done % cfg.save_every == 0) or done == total_steps:
            ckpt.save_training_checkpoint(accelerator, model, tokenizer, cfg.output_dir, done, optimizer, scheduler,
                                          {"heldout": heldout, "config": config_to_dict(cfg)}, cfg.keep_last)
    final = ckpt.export_final(accelerator, model, tokenizer, Path(cfg.output_dir) / "final")
    log.close()
    summary = {"final": str(final), "steps": total_steps, "seconds": round(time.time() - t0, 1), **data_stats}
    if "start" in heldout and "last" in heldout:
        drop = 1 - heldout["last"] / heldout["start"]
        summary.update(heldout_start=heldout["start"], heldout_end=heldout["last"], heldout_drop=drop)
        if accelerator.is_main_process:
            print(f"sft: held-out loss {heldout['start']:.4f} -> {heldout['last']:.4f} ({drop:.1%} lower) in "
                  f"{summary['seconds']} s", flush=True)
    return summary
