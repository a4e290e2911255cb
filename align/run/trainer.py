"""What every trainer (`align sft`, `align rm`, `align grpo`) does around its own step, written once.

    start_run   (bad input already refused by the caller) Accelerator and seed; claim output_dir for this run;
                the newest verified checkpoint; the model, fresh or resumed; its MoE router settings (balance loss,
                load metrics); AdamW with linear warmup + cosine decay, resumed state; accelerate's prepare; the
                metrics logger, cut back to the resumed step
    Run.apply   clip the gradients; the step's loss and gradient norm must be finite (else stop, or skip the
                update: `on_nonfinite`); optimizer and scheduler step; clear the gradients
    Run.steps   the steps still to run, under a progress bar; a SIGTERM or SIGINT stops the run between two steps, the
                finished one checkpointed (align/run/stop.py)
    Run.save    a checkpoint every `save_every` steps and at the last one; one the disk refuses (full, read-only, the
                directory gone) stops the run on every process, naming the path and the bytes needed, the previous
                checkpoint the newest (align/run/storage.py)
    Run.finish  the final model as an ordinary HF directory (OUTPUT/final), the logger closed, OUTPUT/report.md and its
                plots from metrics.jsonl (align/report.py), the directory's lock released (align/run/lock.py:
                start_run took it, before any write)

Every stage's config has output_dir, seed, lr, weight_decay, max_grad_norm, save_every, keep_last, tensorboard,
resume and on_nonfinite with the same meaning; `min_lr_ratio`, `balance_alpha` and `freeze_router` where the stage
has them.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import MAX_SEED, ConfigError, config_to_dict
from ..errors import StorageError
from ..model.moe import Router, router_of
from ..model.precision import Precision, training_device, training_precision
from . import checkpoint as ckpt
from .allocator import keep_freed_memory
from .finite import check_step
from .lock import unlock_dir
from .metrics import MetricsLogger, progress
from .optim import build_optimizer, warmup_cosine
from .rundir import MANIFEST, claim_all
from .storage import GONE_NEXT
from .stop import Stopped, stop_signal


@dataclasses.dataclass
class Run:
    """One stage's training state between `start_run` and `Run.finish`."""

    stage: str                 # "sft" | "rm" | "grpo": names the run in the manifest, errors and console lines
    cfg: Any                   # the stage's config dataclass
    accelerator: Any           # accelerate.Accelerator (CPU: gloo across processes)
    model: Any                 # prepared (wrapped under DDP / FSDP2 / DeepSpeed)
    optimizer: Any
    scheduler: Any
    log: MetricsLogger
    router: Router | None      # the policy's MoE routing, None for a dense model
    start: int                 # steps already done (0 for a new run)
    state: dict                # what the resumed checkpoint saved besides weights ({} for a new run)
    resumed: bool
    precision: Precision = Precision(torch.float32, torch.float32)  # weights' and compute dtype (align.model.precision)
    saved: int = -1            # the last step checkpointed by this process's run (-1: none yet)
    offered: tuple | None = None  # the last (step, tokenizer, state) given to `save`, due or not: what a stop saves
    report: Path | None = None    # OUTPUT/report.md, written by `finish` on the main process (align/report.py)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def apply(self, step: int, values: dict[str, float]) -> tuple[bool, float]:
        """Clip, check `values` and the gradient norm are finite, then step (or skip, `on_nonfinite=skip`).

        Returns (applied, gradient norm); the norm is NaN under DeepSpeed, which clips inside its own step."""
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or math.inf)
        norm = None if norm is None else float(norm)
        applied = check_step(self.stage, step, {**values, "train/grad_norm": norm}, self.cfg.on_nonfinite)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied, math.nan if norm is None else norm

    def steps(self, total: int):
        """`range(start, total)` under a progress bar; between two steps, when a SIGTERM / SIGINT came during the last
        one (on any process), the finished step is checkpointed (if `save` did not just do it) and `Stopped` raised."""
        self.log.span = (self.start, total, time.time())  # the console's step k/N, elapsed and time left
        with stop_signal(self.stage) as received:
            for step in progress(range(self.start, total), total, self.start, self.stage, self.is_main):
                yield step
                if self._stop_agreed(received):
                    raise self._stop(step + 1, total, received[0] if received else signal.SIGTERM)

    def _stop_agreed(self, received: list[int]) -> bool:
        """Whether any process received a stop signal: all of them stop at the same step, or the others would wait
        in the next collective for ever."""
        if self.accelerator.num_processes == 1:
            return bool(received)
        flag = torch.tensor([float(bool(received))], device=self.device)
        return self.accelerator.reduce(flag, reduction="sum").item() > 0

    def _stop(self, done: int, total: int, signum: int) -> Stopped:
        if self.saved != done and self.offered is not None and self.offered[0] == done:
            self._write(*self.offered)
        where = (f"checkpoint {ckpt.checkpoint_path(self.cfg.output_dir, done)} saved; the same command resumes "
                 "from it") if self.saved == done else "no checkpoint of it was offered"
        return Stopped(f"{self.stage}: stopped by {signal.Signals(signum).name} after step {done} of {total}; "
                       f"{where}", signum)

    def save(self, done: int, total: int, tokenizer, state: dict) -> None:
        """Checkpoint step `done` when it is due (every `save_every`, and the last step); `state` is saved with it
        (with the config) and comes back as `Run.state` on resume."""
        self.offered = (done, tokenizer, state)
        if (self.cfg.save_every and done % self.cfg.save_every == 0) or done == total:
            self._write(done, tokenizer, state)

    def _write(self, done: int, tokenizer, state: dict) -> None:
        from ..model.hub import resolve_model

        start = getattr(self.cfg.model, "path", self.cfg.model)  # the model the stage started from
        state = {**state, "config": config_to_dict(self.cfg), "model_revision": resolve_model(start).commit}
        ckpt.on_main(self.accelerator, lambda: self._check_present(f"checkpoint of step {done}"))
        try:
            ckpt.save_training_checkpoint(self.accelerator, self.model, tokenizer, self.cfg.output_dir, done,
                                          self.optimizer, self.scheduler, state, self.cfg.keep_last)
        except StorageError as e:
            raise StorageError(f"{self.stage}: {e}") from None
        self.saved = done

    def _check_present(self, what: str) -> None:
        """(On the main process) refuse to write `what` when the run directory is no longer this run's (deleted,
        moved, unmounted: its manifest is gone); writing would make a directory of that name again, claimed by
        nobody."""
        out = Path(self.cfg.output_dir)
        if not (out / MANIFEST).is_file():
            raise StorageError(f"{self.stage}: {what} not saved: the run directory {out} is gone or no longer this "
                               f"run's ({MANIFEST} is missing: deleted, moved or unmounted during the run); align "
                               f"does not make it again. {GONE_NEXT}")

    def finish(self, tokenizer) -> Path:
        ckpt.on_main(self.accelerator, lambda: self._check_present("final model"))
        try:
            final = ckpt.export_final(self.accelerator, self.model, tokenizer, Path(self.cfg.output_dir) / "final",
                                      dtype=self.precision.compute if self.precision.mixed else None)
        except StorageError as e:
            raise StorageError(f"{self.stage}: {e}") from None
        self.log.close()
        if self.is_main:
            from ..report import write_stage_report

            self.report = write_stage_report(self.cfg.output_dir, self.stage)
            print(f"{self.stage}: report at {self.report}", flush=True)
            unlock_dir(self.cfg.output_dir)  # the run is over (else the process's end releases it)
        return final


def _freeze_router(model, router: Router | None, path: str) -> None:
    from ..config import ConfigError
    from ..model.routing import freeze_router

    if router is None:
        raise ConfigError(f"key 'freeze_router': {path} is not a DeepSeek-V2 MoE model (it has no router)")
    freeze_router(model)


def world_size() -> int:
    """Processes in this run, known before start_run (accelerate's process state, created as start_run's
    Accelerator will be: on CPU with gloo)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).num_processes


def start_run(cfg, stage: str, *, total_updates: int, warmup_steps: int, seed_per_process: bool = False,
              load: Callable[[Path | None, torch.device, torch.dtype], Any] | None = None,
              model_path: str | None = None, precision: Precision | None = None) -> Run:
    """Set up a stage's run (see the module docstring). `load(resume, device, weights_dtype)` builds the model
    (default: the policy of `cfg.model`, from the resumed checkpoint when there is one); `precision`: the weights'
    and the compute dtype (default: from `cfg.model`, `align.model.precision.training_precision`); `seed_per_process`:
    each process seeds `cfg.seed + rank` (GRPO: each samples its own completions)."""
    keep_freed_memory()  # the process reuses freed activations instead of faulting them in again
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from ..model.policy import load_for_training, resolve_dtype

    if precision is None:
        precision = training_precision(resolve_dtype(cfg.model.dtype, training_device()), cfg.model.lora.enabled)
    # each stage sets its own precision: `align run` trains several stages in one process, and accelerate keeps
    # the previous stage's mixed_precision in a process-wide state (the process group in PartialState stays)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **precision.accelerator_kwargs())
    if seed_per_process and cfg.seed + accelerator.num_processes - 1 > MAX_SEED:
        raise ConfigError(f"key 'seed' is {cfg.seed}: each of the {accelerator.num_processes} processes seeds "
                          f"seed + its rank, which must stay <= 2**32 - 1 = {MAX_SEED} (numpy's seed range)")
    set_seed(cfg.seed + (accelerator.process_index if seed_per_process else 0))
    claim_all(accelerator, cfg.output_dir, stage, cfg)  # before any write: the directory is this run's
    resume = ckpt.latest_checkpoint(cfg.output_dir)
    if load is None:
        model = load_for_training(cfg.model, accelerator.device, resume, dtype=precision.weights)
    else:
        model = load(resume, accelerator.device, precision.weights)
    if accelerator.is_main_process and precision.mixed and resume is None:
        print(f"{stage}: {precision.describe()} (full fine-tuning keeps fp32 master weights and optimizer state; "
              "align/model/precision.py)", flush=True)
    router = router_of(model, getattr(cfg, "balance_alpha", 0.0), model_path or str(cfg.model.path))
    if getattr(cfg, "freeze_router", False):  # before the optimizer, which takes the trainable parameters
        _freeze_router(model, router, model_path or str(cfg.model.path))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, total_updates, warmup_steps, getattr(cfg, "min_lr_ratio", 0.0))
    state = ckpt.load_training_state(resume, optimizer, scheduler) if resume is not None else {}
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    log = MetricsLogger(cfg.output_dir, enabled=accelerator.is_main_process, tensorboard=cfg.tensorboard,
                        prefix=f"{stage} ", wandb=getattr(cfg, "wandb", None), settings=config_to_dict(cfg),
                        resumed=resume is not None)
    start = state.get("step", 0)
    log.truncate_after(start)
    return Run(stage, cfg, accelerator, model, optimizer, scheduler, log, router, start, state, resume is not None,
               precision)
