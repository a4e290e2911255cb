"""`align sft`: supervised fine-tuning on chats, loss on assistant tokens only (DeepSeek-V2 §4.1).

    loss = Σ_{assistant tokens} −log π_θ(x_t | x_<t) / (number of assistant tokens in the global batch)
           + α · Σ_{MoE layers} Σ_i f_i P_i                                       (expert-level balance loss, align.model.moe)

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
from collections.abc import Sequence

import torch

from .config import ConfigError, check_seed, directory_path, option, require, require_steps
from .model.logprobs import forward_logprobs
from .model.moe import Router
from .model.policy import ModelConfig, check_model_dir, load_tokenizer
from .run.data import (
    FIRST_ASSISTANT,
    IGNORE,
    DataError,
    TokenizedChats,
    batch_indices,
    chat_rows,
    collate,
    collate_packed,
    load_chats,
    pack,
    tokenize_chats,
)
from .run.finite import NonFinitePolicy, nonfinite_option
from .run.rundir import ResumeMode, resume_option
from .run.tracking import WandbConfig
from .run.trainer import start_run, world_size


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
    wandb: WandbConfig = option(factory=WandbConfig,
                                help="Weights & Biases: {project, name, tags} (align/run/tracking.py).")
    seed: int = option(0, help="Seed for data order and initialisation.")
    resume: ResumeMode = resume_option()
    on_nonfinite: NonFinitePolicy = nonfinite_option("loss or gradient norm")

    def validate(self) -> None:
        self.wandb.validate()
        self.output_dir = directory_path(self.output_dir, "output_dir")
        self.model.validate()
        require(bool(self.train_data), "train_data", "at least one file", self.train_data)
        for key in ("max_length", "batch_size", "grad_accum", "logprob_chunk"):
            require(getattr(self, key) > 0, key, "a positive integer", getattr(self, key))
        require(self.epochs > 0 or self.max_steps > 0, "epochs", "positive (or max_steps > 0)", self.epochs)
        require(self.max_steps >= 0, "max_steps", ">= 0", self.max_steps)
        require_steps(self.max_steps, "max_steps")
        check_seed(self.seed)
        require(self.lr > 0, "lr", "positive", self.lr)
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", self.warmup_ratio)
        require(self.balance_alpha >= 0, "balance_alpha", ">= 0", self.balance_alpha)
        for key in ("eval_every", "save_every", "keep_last", "max_grad_norm"):
            require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))


def _prepare_data(cfg: SFTConfig, tokenizer) -> tuple[Sequence[dict], list[dict], dict | None]:
    """Load and validate every training row, tokenise the held-out rows (before anything is written). Training
    rows are tokenised per batch as they are drawn (`TokenizedChats`: the first row of each file is tokenised here,
    so a chat template the loss mask cannot be read from is refused now); with packing, which needs every length,
    all of them here, with their truncated / dropped counts (else None)."""
    chats = chat_rows(cfg.train_data)
    for i, chat in enumerate(chats):  # the validation pass: every row's fields, one streaming read
        if chat[0]["role"] == "assistant":
            raise DataError(f"{chats.where(i)}: {FIRST_ASSISTANT}")
    held = []
    for path in cfg.eval_data:
        held += tokenize_chats(tokenizer, load_chats(path), cfg.max_length, str(path))[0]
    if not cfg.packing:
        train = TokenizedChats(tokenizer, chats, cfg.max_length)
        for end in [0, *chats.ends[:-1]]:
            train[end]
        return train, held, None
    examples, stats = [], {"rows": 0, "truncated": 0, "dropped": 0}
    for path in cfg.train_data:
        ex, s = tokenize_chats(tokenizer, load_chats(path), cfg.max_length, str(path))
        examples += ex
        stats = {k: stats[k] + s[k] for k in stats}
    return pack(examples, cfg.max_length, tokenizer.pad_token_id), held, stats


def _to_batch(rows: list[dict], packing: bool, pad_id: int, device) -> dict[str, torch.Tensor]:
    batch = collate_packed(rows, pad_id) if packing else collate(rows, pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def _nll_sum(model, batch: dict, cfg: SFTConfig, router: Router | None):
    """Summed NLL over labelled tokens, their count, balance loss, router logits of one micro-batch."""
    ids = batch["input_ids"]                                                        # [B, T]
    out = forward_logprobs(model, ids, ids.shape[1] - 1, attention_mask=batch.get("attention_mask"),
                           position_ids=batch.get("position_ids"), chunk_tokens=cfg.logprob_chunk,
                           router_logits=router is not None)
    labels = batch["labels"][:, 1:]                                                 # [B, T-1]
    mask = (labels != IGNORE).float()                                               # [B, T-1]
    nll = -(out.logprobs * mask).sum()
    balance = torch.zeros((), device=ids.device)
    if router is not None and cfg.balance_alpha > 0:
        balance = router.balance_loss(out.router_logits, cfg.balance_alpha, _token_mask(batch))
    return nll, mask.sum(), balance, out.router_logits


def _token_mask(batch: dict) -> torch.Tensor | None:
    """[B*T] 1 on real tokens (None for packed rows, which have no padding mask)."""
    return batch["attention_mask"].reshape(-1) if "attention_mask" in batch else None


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
    # -- everything that can fail on bad input happens before the first write
    context = check_model_dir(cfg.model.path, policy=True).get("max_position_embeddings")
    if context and cfg.max_length > context:
        raise ConfigError(f"key 'max_length' is {cfg.max_length}, beyond the model's context of {context} tokens")
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.chat_template)
    train_rows, held_rows, data_stats = _prepare_data(cfg, tokenizer)
    world = world_size()
    global_batch = cfg.batch_size * cfg.grad_accum * world
    if not cfg.max_steps:
        per_epoch = max(1, len(train_rows) // global_batch)
        require_steps(cfg.epochs * per_epoch, "epochs", f"epochs {cfg.epochs:g} x {per_epoch} steps per epoch "
                      f"({len(train_rows)} rows / {global_batch} a step)")
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * max(1, len(train_rows) // global_batch)))

    run = start_run(cfg, "sft", total_updates=total_steps, warmup_steps=int(cfg.warmup_ratio * total_steps))
    accelerator, rank, pad_id = run.accelerator, run.accelerator.process_index, tokenizer.pad_token_id
    if run.is_main:
        where = f"resuming at step {run.start}" if run.resumed else "new run"
        counts = (f"{data_stats['truncated']} truncated, {data_stats['dropped']} dropped" if data_stats else
                  "tokenised per batch, truncation counted in train/truncated_rows")
        print(f"sft: {len(train_rows)} rows ({counts}), {total_steps} steps of {global_batch}, {where}", flush=True)
    heldout = dict(run.state.get("heldout", {}))
    if held_rows and run.start == 0:
        heldout["start"] = heldout_loss(run.model, held_rows, cfg, pad_id, run.device)
        run.log.log(0, {"eval/loss": heldout["start"]})
    t0, skipped = time.time(), 0
    for step in run.steps(total_steps):  # a SIGTERM / SIGINT stops between two steps, checkpointed
        # -- this process's micro-batches of global batch `step`
        idx = batch_indices(len(train_rows), global_batch, step, cfg.seed)
        mine = idx[rank * cfg.batch_size * cfg.grad_accum:(rank + 1) * cfg.batch_size * cfg.grad_accum]
        rows = [train_rows[i] for i in mine]  # tokenised here unless packed (`TokenizedChats`)
        micro = [_to_batch(rows[m * cfg.batch_size:(m + 1) * cfg.batch_size], cfg.packing, pad_id, run.device)
                 for m in range(cfg.grad_accum)]
        truncated = accelerator.reduce(torch.tensor(float(sum(r.get("truncated", False) for r in rows)),
                                                    device=run.device), reduction="sum")
        n_tokens = sum((mb["labels"][:, 1:] != IGNORE).sum() for mb in micro).float()
        n_tokens = accelerator.reduce(n_tokens, reduction="sum").clamp_min(1.0)
        # -- loss = token-mean NLL over the global batch (+ balance loss), accumulated over micro-batches
        loss_sum, balance_sum, router_logits = 0.0, 0.0, ()
        for m, mb in enumerate(micro):
            sync = contextlib.nullcontext() if m == len(micro) - 1 else accelerator.no_sync(run.model)
            with sync:
                nll, _, balance, router_logits = _nll_sum(run.model, mb, cfg, run.router)
                accelerator.backward(nll * world / n_tokens + balance / len(micro))
            loss_sum += nll.item() / n_tokens.item() * world
            balance_sum += balance.item() / len(micro)
        if world > 1:  # each process summed its share of the global token mean: add the shares up
            shares = accelerator.reduce(torch.tensor([loss_sum, balance_sum], device=run.device), reduction="sum")
            loss_sum, balance_sum = shares[0].item() / world, shares[1].item() / world
        applied, grad_norm = run.apply(step + 1, {"loss/sft": loss_sum, "loss/balance": balance_sum})
        skipped += not applied
        done = step + 1
        # -- metrics, evaluation, checkpoint
        metrics = {"loss/sft": loss_sum, "loss/balance": balance_sum, "train/grad_norm": grad_norm,
                   "train/lr": run.scheduler.get_last_lr()[0], "train/tokens": int(n_tokens.item()),
                   "perf/sec_per_step": (time.time() - t0) / (done - run.start), "train/skipped_nonfinite": skipped}
        if data_stats is None:  # rows of the global batch cut at max_length (packed rows were counted up front)
            metrics["train/truncated_rows"] = int(truncated.item())
        if run.router is not None:
            metrics.update(run.router.load(router_logits, _token_mask(micro[-1])))
        if held_rows and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
            heldout["last"] = metrics["eval/loss"] = heldout_loss(run.model, held_rows, cfg, pad_id, run.device)
        run.log.log(done, metrics, echo=(done % cfg.log_every == 0 or done == total_steps or "eval/loss" in metrics))
        run.save(done, total_steps, tokenizer, {"heldout": heldout})
    final = run.finish(tokenizer)
    summary = {"final": str(final), "steps": total_steps, "seconds": round(time.time() - t0, 1),
               **(data_stats or {"rows": len(train_rows)}), "report": run.report and str(run.report)}
    if "start" in heldout and "last" in heldout:
        drop = 1 - heldout["last"] / heldout["start"]
        summary.update(heldout_start=heldout["start"], heldout_end=heldout["last"], heldout_drop=drop)
        if run.is_main:
            print(f"sft: held-out loss {heldout['start']:.4f} -> {heldout['last']:.4f} ({drop:.1%} lower) in "
                  f"{summary['seconds']} s", flush=True)
    return summary
