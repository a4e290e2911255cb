"""`align rm`: train a reward model with the Bradley-Terry pairwise loss.

    loss = −log σ(r_θ(x, y_chosen) − r_θ(x, y_rejected))          (mean over pairs)

Rows are `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`, or TRL's implicit-prompt
`{"chosen": messages, "rejected": messages}` whose prompt is the messages both begin with (`run.data.row_pair`, as in
ultrafeedback-binarized); each side is rendered
as one conversation with the tokenizer's chat template and scored by a one-output sequence-classification head
(`AutoModelForSequenceClassification`, num_labels=1) on the last real token. The starting point is a causal-LM
checkpoint (the head is new) or a sequence-classification one. Reports held-out pair accuracy (share of pairs with
r_chosen > r_rejected). Set-up, resume, checkpoints and the finiteness check are the shared ones (`align.run.trainer`);
OUTPUT/final is an ordinary HF directory that the `classifier` reward loads.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F

from .config import check_seed, directory_path, option, require, require_steps
from .model.hub import model_dir
from .model.policy import chat_template_text, check_model_dir, load_tokenizer, resolve_dtype
from .model.precision import training_device, training_precision
from .run.data import batch_indices, load_rows, row_pair
from .run.finite import NonFinitePolicy, nonfinite_option
from .run.rundir import ResumeMode, resume_option
from .run.tracking import WandbConfig
from .run.trainer import start_run


@dataclasses.dataclass
class RMModelConfig:
    path: str = option(help="The starting checkpoint: a causal LM (the head is new) or a sequence classifier, as a "
                            "directory or a hub id owner/name[@revision] (align/model/hub.py), as sft / grpo's "
                            "model.path.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Compute dtype: auto = bfloat16 on GPU, float32 on CPU; bfloat16 / float16 keep fp32 master weights "
        "and optimizer state (align/model/precision.py).")
    chat_template: str = option("", "A chat template replacing the tokenizer's (a file or the Jinja text; '' = the "
                                    "tokenizer's own), as sft / grpo's model.chat_template; saved with the RM.")

    def validate(self) -> None:
        require(bool(self.path), "model.path", "a checkpoint directory or hub id", self.path)
        if self.chat_template:
            chat_template_text(self.chat_template)


@dataclasses.dataclass
class RMConfig:
    model: RMModelConfig = option(help="The starting checkpoint (model.path, model.dtype).")
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
        self.model.validate()
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
    """(chosen text, rejected text) per row (explicit or implicit prompt: `align.run.data.row_pair`), rendered with
    the chat template; errors name file:row:field."""
    out = []
    for i, row in enumerate(load_rows(path)):
        prompt, chosen, rejected = row_pair(row, f"{path}:row {i + 1}")
        out.append(tuple(tokenizer.apply_chat_template(prompt + side, tokenize=False) for side in (chosen, rejected)))
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
    """`load` for start_run: a one-output sequence classifier from cfg.model.path (a new head on a causal LM), or the
    resumed checkpoint."""
    def load(resume, device, dtype):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(resume or model_dir(cfg.model.path)),
                                                                   num_labels=1, dtype=dtype)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.to(device)
    return load


def train_rm(cfg: RMConfig) -> dict:
    """Train the reward model to the end (resuming from the newest checkpoint in output_dir); returns a summary."""
    check_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.chat_template)
    tokenizer.padding_side = "right"  # the score is read at the last real token
    train = [p for path in cfg.train_data for p in load_pairs(path, tokenizer)]
    held = [p for path in cfg.eval_data for p in load_pairs(path, tokenizer)]
    require_steps(cfg.epochs * len(train) / cfg.batch_size, "epochs",
                  f"epochs {cfg.epochs:g} x {len(train)} pairs / batch_size {cfg.batch_size}")
    steps = max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))

    run = start_run(cfg, "rm", total_updates=steps, warmup_steps=int(cfg.warmup_ratio * steps),
                    load=_load_rm(cfg, tokenizer), model_path=cfg.model.path,
                    precision=training_precision(resolve_dtype(cfg.model.dtype, training_device()), lora=False))
    model, device = run.model, run.device
    start = time.time()
    acc_start = run.state.get("pair_accuracy_start")
    if held and not run.resumed:
        acc_start = pair_accuracy(model, tokenizer, held, cfg.max_length, device)
        run.log.log(0, {"eval/pair_accuracy": acc_start})
    for step in run.steps(steps):  # a SIGTERM / SIGINT stops between two steps, checkpointed
        batch = [train[i] for i in batch_indices(len(train), cfg.batch_size, step, cfg.seed)]
        r = _rewards(model, tokenizer, [c for c, _ in batch] + [x for _, x in batch], cfg.max_length, device)
        margin = r[:len(batch)] - r[len(batch):]                                        # [B]
        loss = -F.logsigmoid(margin).mean()
        run.accelerator.backward(loss)
        _, grad_norm = run.apply(step + 1, {"loss/bt": loss.item()})
        metrics = {"loss/bt": loss.item(), "rm/train_accuracy": (margin > 0).float().mean().item(),
                   "rm/margin": margin.mean().item(), "train/grad_norm": grad_norm,
                   "train/lr": run.scheduler.get_last_lr()[0]}
        if held and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == steps):
            metrics["eval/pair_accuracy"] = pair_accuracy(model, tokenizer, held, cfg.max_length, device)
        run.log.log(step + 1, metrics, echo="eval/pair_accuracy" in metrics)
        run.save(step + 1, steps, tokenizer, {"pair_accuracy_start": acc_start})
    final = run.finish(tokenizer)
    summary = {"final": str(final), "steps": steps, "pairs": len(train), "seconds": round(time.time() - start, 1),
               "report": run.report and str(run.report)}
    if held:
        summary.update(heldout_pairs=len(held), pair_accuracy_start=acc_start,
                       pair_accuracy=pair_accuracy(model, tokenizer, held, cfg.max_length, device))
        if run.is_main:
            print(f"rm: held-out pair accuracy {acc_start:.1%} -> {summary['pair_accuracy']:.1%} "
                  f"({len(held)} pairs) in {summary['seconds']} s", flush=True)
    return summary
