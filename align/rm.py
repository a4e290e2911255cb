"""`align rm`: train a reward model with the Bradley-Terry pairwise loss.

    loss = −log σ(r_θ(x, y_chosen) − r_θ(x, y_rejected))          (mean over pairs)

Rows are `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`; each side is rendered
as one conversation with the tokenizer's chat template and scored by a one-output sequence-classification head
(`AutoModelForSequenceClassification`, num_labels=1) on the last real token. The starting point is a causal-LM
checkpoint (the head is new) or a sequence-classification one. Reports held-out pair accuracy (share of pairs with
r_chosen > r_rejected). The output directory is an ordinary HF directory that the `classifier` reward loads.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .allocator import keep_freed_memory
from .checkpoint import atomic_dir
from .config import option, require
from .data import DataError, as_messages, batch_indices, load_rows
from .metrics import MetricsLogger, progress
from .optim import build_optimizer, warmup_cosine
from .policy import check_model_dir, load_tokenizer
from .rundir import ResumeMode, claim, resume_option


@dataclasses.dataclass
class RMConfig:
    model: str = option(help="Starting checkpoint directory (causal LM or sequence classification).")
    output_dir: str = option(help="Where the trained reward model (an HF directory) and metrics go.")
    train_data: list[str] = option(help="Preference files with prompt / chosen / rejected.")
    eval_data: list[str] = option(factory=list, help="Held-out preference files (pair accuracy).")
    max_length: int = option(512, "Tokens per (prompt, response) conversation.")
    epochs: float = option(1.0, "Passes over the pairs.")
    batch_size: int = option(16, "Pairs per optimizer step.")
    lr: float = option(1e-5, "Peak learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup_ratio: float = option(0.05, "Share of steps with linear warmup.")
    max_grad_norm: float = option(1.0, "Gradient clipping (0: off).")
    eval_every: int = option(50, "Steps between held-out evaluations (0: end only).")
    tensorboard: bool = option(True, "Also write TensorBoard event files (when installed).")
    seed: int = option(0, "Seed for the pair order.")
    resume: ResumeMode = resume_option()

    def validate(self) -> None:
        require(bool(self.train_data), "train_data", "at least one file", self.train_data)
        for key in ("max_length", "batch_size"):
            require(getattr(self, key) > 0, key, "a positive integer", getattr(self, key))
        require(self.epochs > 0, "epochs", "positive", self.epochs)
        require(self.lr > 0, "lr", "positive", self.lr)


def load_pairs(path, tokenizer) -> list[tuple[str, str]]:
    """(chosen text, rejected text) per row, rendered with the chat template; errors name file:row:field."""
    out = []
    for i, row in enumerate(load_rows(path)):
        where = f"{path}:row {i + 1}"
        for key in ("prompt", "chosen", "rejected"):
            if row.get(key) is None:
                raise DataError(f"{where}: missing field '{key}'")
        prompt = as_messages(row["prompt"], "user", where, "prompt")
        sides = [prompt + as_messages(row[k], "assistant", where, k) for k in ("chosen", "rejected")]
        out.append(tuple(tokenizer.apply_chat_template(s, tokenize=False) for s in sides))
    return out


def _rewards(model, tokenizer, texts: list[str], max_length: int, device) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, add_special_tokens=False,
                    return_tensors="pt").to(device)
    return model(**enc).logits[:, 0].float()                                        # [n]


@torch.no_grad()
def pair_accuracy(model, tokenizer, pairs, max_length: int, device, batch: int = 32) -> float:
    model.eval()
    right = 0
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        r = _rewards(model, tokenizer, [c for c, _ in chunk] + [r for _, r in chunk], max_length, device)
        right += (r[:len(chunk)] > r[len(chunk):]).sum().item()
    model.train()
    return right / max(1, len(pairs))


def train_rm(cfg: RMConfig) -> dict:
    from transformers import AutoModelForSequenceClassification

    keep_freed_memory()  # the process reuses freed activations instead of faulting them in again
    check_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    tokenizer.padding_side = "right"  # the score is read at the last real token
    train = [p for path in cfg.train_data for p in load_pairs(path, tokenizer)]
    held = [p for path in cfg.eval_data for p in load_pairs(path, tokenizer)]

    claim(cfg.output_dir, "rm", cfg, force=cfg.resume == "force")  # before any write
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=1).to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    steps = max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, steps, int(cfg.warmup_ratio * steps))
    log = MetricsLogger(cfg.output_dir, tensorboard=cfg.tensorboard, prefix="rm ")
    log.truncate_after(-1)  # a rerun of the same command trains from the start again
    start = time.time()
    acc_start = pair_accuracy(model, tokenizer, held, cfg.max_length, device) if held else None
    model.train()
    for step in progress(range(steps), steps, 0, "rm"):
        batch = [train[i] for i in batch_indices(len(train), cfg.batch_size, step, cfg.seed)]
        r = _rewards(model, tokenizer, [c for c, _ in batch] + [x for _, x in batch], cfg.max_length, device)
        margin = r[:len(batch)] - r[len(batch):]                                        # [B]
        loss = -F.logsigmoid(margin).mean()
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"loss/bt": loss.item(), "rm/train_accuracy": (margin > 0).float().mean().item(),
                   "rm/margin": margin.mean().item()}
        if held and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == steps):
            metrics["eval/pair_accuracy"] = pair_accuracy(model, tokenizer, held, cfg.max_length, device)
        log.log(step + 1, metrics, echo="eval/pair_accuracy" in metrics)
    with atomic_dir(Path(cfg.output_dir) / "final") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log.close()
    summary = {"final": str(Path(cfg.output_dir) / "final"), "steps": steps, "pairs": len(train),
               "seconds": round(time.time() - start, 1)}
    if held:
        summary.update(heldout_pairs=len(held), pair_accuracy_start=acc_start,
                       pair_accuracy=pair_accuracy(model, tokenizer, held, cfg.max_length, device))
        print(f"rm: held-out pair accuracy {acc_start:.1%} -> {summary['pair_accuracy']:.1%} "
              f"({len(held)} pairs) in {summary['seconds']} s", flush=True)
    return summary
