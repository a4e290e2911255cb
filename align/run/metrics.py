"""Metrics: one JSON object per line in OUTPUT/metrics.jsonl (appended, so a resumed run continues the file; one row
per step however often the run was killed and restarted: `MetricsLogger.truncate_after`), a short console line,
TensorBoard event files when `tensorboard` is installed, and Weights & Biases when the stage's `wandb` settings (or
WANDB_PROJECT) ask for it (align/run/tracking.py). Names are namespaced: `loss/sft`,
`reward/helpful`, `moe/load_max`. The file is strict JSON: a non-finite value (a NaN mean of nothing scored) is
written as null, and `read_metrics` gives it back as NaN."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True, prefix: str = "",
                 wandb=None, settings: dict | None = None, resumed: bool = False):
        """`wandb`: the stage's WandbConfig (align/run/tracking.py), `settings` its config as the W&B run's config;
        `resumed`: align resumes this run (the W&B run continues)."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.prefix = prefix
        self.start = time.time()
        self._tb = self._wandb = None
        self.span: tuple[int, int, float] | None = None  # (first step, last step, start time) of the running loop
        if enabled and wandb is not None:
            from .tracking import start_wandb

            self._wandb = start_wandb(wandb, output_dir, settings or {}, resumed)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                self._tb = None

    @property
    def tensorboard(self):
        """The TensorBoard writer (None when off), for what is not a scalar (align/grpo/samples.py)."""
        return self._tb

    @property
    def wandb(self):
        """The W&B run (None when off), for what is not a scalar (align/grpo/samples.py)."""
        return self._wandb

    def truncate_after(self, step: int) -> None:
        """At the start of a run from the checkpoint of `step` (0: none, the run starts over): keep only the rows
        that checkpoint covers, so metrics.jsonl stays one row per step when the steps after it are logged again.
        Resumed at step > 0, the rows of steps up to it stay (the start evaluation's step-0 row included: a resumed
        run does not log it again); started at 0, no row stays, since every row, step 0's too, is of an attempt
        whose state is gone and the new run logs its start evaluation again (a GRPO run killed in step 1 logged
        step 0 twice)."""
        if not self.enabled or not self.path.is_file():
            return
        from .checkpoint import atomic_write_text

        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = _parse(self.path, lines)
        kept = [line for line, row in zip(lines, rows) if 0 < step and row["step"] <= step]
        if len(kept) != len(lines):
            text = "".join(line + "\n" for line in kept)
            with self._guarded(f"{self.prefix}{self.path} cut back to step {step}", len(text.encode())):
                atomic_write_text(self.path, text)

    def _guarded(self, what: str, needed: int):
        """A write of metrics.jsonl that the disk refuses: a StorageError (align/run/storage.py)."""
        from .storage import guarded_write

        return guarded_write(self.path, self.path.parent, needed, what, lambda: (
            "The rows written before stay; once the disk is fixed the same command resumes from the newest "
            "checkpoint and logs each later step once (a half-written last row is dropped)"))

    def log(self, step: int, metrics: dict[str, float], echo: bool = True) -> None:
        if not self.enabled:
            return
        row = strict_json({"step": step, "time": round(time.time() - self.start, 3), **metrics}) + "\n"
        # the run directory is there (a run claimed it); one that is gone is not made again
        with self._guarded(f"{self.prefix}metrics row of step {step}", len(row)):
            with self.path.open("a", encoding="utf-8") as f:
                f.write(row)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if echo:
            from tqdm.auto import tqdm

            tqdm.write(console_line(self.prefix, step, metrics, self.span))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


CONSOLE = ("loss/sft", "loss/bt", "loss/policy", "loss/kl", "reward/total", "reward/weighted", "rm/train_accuracy",
           "rollout/completion_len", "tools/used_frac", "train/grad_norm", "perf/step_s")


REWARD_COUNTS = ("reward/skipped_groups", "reward/partially_scored")  # reward/ keys that count, not components


def _shown(key: str) -> bool:
    """The console's short set: the main losses and rewards, each reward component, every eval metric."""
    component = (key.startswith("reward/") and key.count("/") == 1 and not key.endswith(("_std", "_applies", "_frac"))
                 and key not in REWARD_COUNTS)
    return key in CONSOLE or component or key.startswith("eval/")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def console_line(prefix: str, step: int, metrics: dict, span: tuple[int, int, float] | None,
                 now: float | None = None) -> str:
    """`grpo step 12/200 [1m03s<16m27s] reward/total=0.42 ... (+31 in metrics.jsonl)`: the step of the loop's
    total, elapsed and estimated time left, the short set of metrics; the rest only in the files."""
    where = f"{prefix}step {step}"
    if span is not None:
        first, total, started = span
        elapsed = (time.time() if now is None else now) - started
        left = elapsed / (step - first) * (total - step) if step > first else None
        where += f"/{total} [{_clock(elapsed)}<{_clock(left) if left is not None else '?'}]"
    shown = {k: v for k, v in metrics.items() if _shown(k)}
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    more = len(metrics) - len(shown)
    return f"{where}: {text}" + (f" (+{more} in metrics.jsonl)" if more else "")


def progress(iterable, total: int, initial: int, desc: str, enabled: bool = True):
    """A progress bar with ETA over the steps of a stage (only on a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=None if enabled else True,
                dynamic_ncols=True, leave=False)


def finite_or_none(value):
    """`value` with every non-finite float (at any depth of dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value, **kwargs) -> str:
    """JSON that strict readers accept: non-finite floats as null, never a bare NaN / Infinity."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def _parse(path: Path, lines: list[str]) -> list[dict]:
    """The rows of metrics.jsonl; a half-written last line (a run killed mid-write) is dropped with a warning, a
    malformed line elsewhere is an error naming it."""
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no integer 'step'")
            row = {k: math.nan if v is None else v for k, v in row.items()}  # null: a non-finite value
        except ValueError as e:
            if i == len(lines) - 1:
                print(f"warning: {path}:{i + 1}: dropped a half-written last line ({e})", flush=True)
                break
            raise ValueError(f"{path}:{i + 1}: malformed metrics row ({e})") from None
        rows.append(row)
    return rows


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return _parse(path, [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()])
