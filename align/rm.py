"""`align rm`: train a reward model with the Bradley-Terry pairwise loss.

    loss = −log σ(r_θ(x, y_chosen) − r_θ(x, y_rejected))          (mean over pairs)

Rows are `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`; each side is rendered
as one conversation with the tokenizer's chat template and scored by a one-output sequence-classification head
(`AutoModelForSequenceClassification`, num_labels=1) on the last real token. The starting point is a causal-LM
checkpoint (the head is new) or a sequence-classification one. Reports held-out pair accuracy (share of pairs with
r_chosen > r_rejected). Set-up, resume, checkpoints and the finiteness check are the shared ones (`align.run.trainer`);
OUTPUT/final is an ordinary HF directory that the `classifier` reward loads.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from .config import check_seed, directory_path, epoch_steps, option, require
from .model.hub import model_dir
from .model.policy import check_model_dir, load_tokenizer, resolve_dtype
from .model.precision import training_device, training_precision
from .run.data import DataError, as_messages, batch_indices, load_rows
from .run.finite import NonFinitePolicy, nonfinite_option
from .run.rundir import ResumeMode, resume_option
from .run.tracking import WandbConfig
from .run.trainer import start_run


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
    save_every: int = option(0, "Steps between checkpoints (0: only at the end).")
    keep_last: int = option(1, "Checkpoints kept (0: all).")
    tensorboard: bool = option(True, "Also write TensorBoard event files (when installed).")
    wandb: WandbConfig = option(factory=WandbConfig,
                                help="Weights & Biases: {project, name, tags} (align/run/tracking.py).")
    seed: int = option(0, "Seed for the pair order.")
    resume: ResumeMode = resume_option()
    on_nonfinite: NonFinitePolicy = nonfinite_option("loss or gradient norm")

    def validate(self) -> None:
        self.wandb.validate()
        self.output_dir = directory_path(self.output_dir, "output_dir")
        require(bool(self.train_data), "train_data", "at least one file", self.train_data)
        for key in ("max_length", "batch_size"):
            require(getattr(self, key) > 0, key, "a positive integer", getattr(self, key))
        require(self.epochs > 0, "epochs", "positive", self.epochs)
        check_seed(self.seed)
        require(self.lr > 0, "lr", "positive", self.lr)
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", self.warmup_ratio)
        for key in ("eval_every", "save_every", "keep_last", "max_grad_norm"):
            require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))


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


def _load_rm(cfg: RMConfig, tokenizer):
    """`load` for start_run: a one-output sequence classifier from cfg.model (a new head on a causal LM), or the
    resumed checkpoint."""
    def load(resume, device, dtype):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(resume or model_dir(cfg.model)), num_labels=1,
                                                                   dtype=dtype)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.to(device)
    return load


def train_rm(cfg: RMConfig) -> dict:
    """Train the reward model to the end (resuming from the newest checkpoint in output_dir); returns a summary."""
    check_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    tokenizer.padding_side = "right"  # the score is read at the last real token
    train = [p for path in cfg.train_data for p in load_pairs(path, tokenizer)]
    held = [p for path in cfg.eval_data for p in load_pairs(path, tokenizer)]
    steps = epoch_steps(cfg.epochs, len(train) / cfg.batch_size)

    run = start_run(cfg, "rm", total_updates=steps, warmup_steps=int(cfg.warmup_ratio * steps),
                    load=_load_rm(cfg, tokenizer), model_path=cfg.model,
                    precision=training_precision(resolve_dtype("auto", training_device()), lora=False))
    model, device = run.model, run.device
    start = time.time()
    acc_start = run.state.get("pair_accuracy_start")
    if held and not run.resumed:
        acc_start = pair_accuracy(model, tokenizer, held, cfg.max_length, device)
    for step in run.steps(steps):  # a SIGTERM / SIGINT stops between two steps, checkpointed
        batch = [train[i] for i in batch_indices(len(train), cfg.batch_size, step, cfg.seed)]
        r = _rewards(model, tokenizer, [c for c, _ in batch] + [x for _, x in batch], cfg.max_length, device)
        margin = r[:len(batch)] - r[len(batch):]                                        # [B]
        loss = -F.logsigmoid(margin).mean()
        run.accelerator.backward(loss)
        _, grad_norm = run.apply(step + 1, {"loss/bt": loss.item()})
        metrics = {"loss/bt": loss.item(), "rm/train_accuracy": (margin > 0).float().mean().item(),
                   "rm/margin": margin.mean().item(), "train/grad_norm": grad_norm}
        if held and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == steps):
            metrics["eval/pair_accuracy"] = pair_accuracy(model, tokenizer, held, cfg.max_length, device)
        run.log.log(step + 1, metrics, echo="eval/pair_accuracy" in metrics)
        run.save(step + 1, steps, tokenizer, {"pair_accuracy_start": acc_start})
    final = run.finish(tokenizer)
    summary = {"final": str(final), "steps": steps, "pairs": len(train), "seconds": round(time.time() - start, 1)}
    if held:
        summary.update(heldout_pairs=len(held), pair_accuracy_start=acc_start,
                       pair_accuracy=pair_accuracy(model, tokenizer, held, cfg.max_length, device))
        if run.is_main:
            print(f"rm: held-out pair accuracy {acc_start:.1%} -> {summary['pair_accuracy']:.1%} "
                  f"({len(held)} pairs) in {summary['seconds']} s", flush=True)
    return summary
