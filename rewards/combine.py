"""Score completions with several named rewards and combine them.

    total_i = Σ_k c_k · r_k,i          (reward_mode "sum"; GRPO then normalises the total within each group)

The per-completion components are returned as well: GRPO's `normalize` mode (Σ_k c_k z_k with each component
z-scored within its group) combines them on the GRPO side, beside the advantages (align/grpo/core.py), since groups
are GRPO's; this library knows nothing of align.

Each reward is called once per batch with the prompts, the completions and the rows' other columns (one entry per
completion). Its output is checked: one score per completion, each a finite float or None (the reward does not
apply: left out of that component's statistics, never counted as 0). A None for a whole group (the reward does not
apply to that prompt) adds nothing to any of its totals. A completion that a component left unscored while it scored
others of the same group (an unparsed judge reply, a check that timed out) gets no total: its sum would lack a term
its siblings have, so it is left out of its group's statistics (advantage 0), counted in `reward/partially_scored`.
A reward that raises, exits (`sys.exit`, in process or in its isolated worker), runs past its `timeout_s` (every
call has one: 300 s unless a recipe sets another, or 0 for none), returns the wrong number of scores or a non-finite
value, or needs a column a row lacks, is a `RewardError` naming the reward and the row (a KeyboardInterrupt is the
user's and goes on). With `on_error="skip"` the batch is re-scored one prompt group at a time and the groups that
fail are dropped (counted in `reward/skipped_groups`, the last error per reward in `Scores.errors`) instead of
stopping the run.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time

import torch

from .calling import RewardError, RewardTimeout, build_reward, call_with_deadline, required_columns
from .isolation import IsolatedReward
from .registry import RewardResult, get_reward

__all__ = ["RewardError", "RewardSpec", "Scores", "check_columns", "close_rewards", "score"]

DEFAULT_TIMEOUT_S = 300.0  # every call has a deadline unless a recipe says timeout_s: 0


@dataclasses.dataclass
class RewardSpec:
    name: str
    weight: float = 1.0
    label: str = ""
    args: dict = dataclasses.field(default_factory=dict)
    isolate: bool = False        # score in a separate worker process (survives hangs and crashes)
    timeout_s: float = dataclasses.field(default=DEFAULT_TIMEOUT_S, metadata={"help": (
        "Seconds one call (a batch) may take; a later one is a RewardError naming the reward. Default 300; 0 "
        "turns the limit off. In process a late sync call is abandoned on its thread (an async one cancelled); "
        "with isolate its worker is killed.")})

    @property
    def key(self) -> str:
        """The component's name in metrics: the label, else the reward name."""
        return self.label or self.name

    def check(self) -> None:
        """Resolve the reward and check `args` against it without building anything (for config validation)."""
        fn = get_reward(self.name)
        if getattr(fn, "is_factory", False):
            try:
                inspect.signature(fn).bind(**self.args)
            except TypeError as e:
                raise KeyError(f"reward {self.name!r} takes settings in 'args': {e}") from None
        elif self.args:
            raise KeyError(f"reward {self.name!r} takes no 'args' (got {sorted(self.args)})")

    def load(self):
        """The scoring function (a factory is called once with `args`; the result is cached)."""
        cached = getattr(self, "_fn", None)
        if cached is not None:
            return cached
        if self.isolate:
            self.check()
            fn = IsolatedReward({"name": self.name, "args": self.args}, self.key, self.timeout_s)
        else:
            fn = build_reward(self.name, self.args)
        object.__setattr__(self, "_fn", fn)
        return fn


@dataclasses.dataclass
class Scores:
    total: torch.Tensor                      # [N] combined reward, NaN where no reward scored the row
    components: dict[str, torch.Tensor]      # name -> [N], NaN where the reward returned None
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    keep: torch.Tensor | None = None         # [N] bool: rows kept (False where a group was skipped)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # reward -> its last error (on_error=skip)

    def metrics(self) -> dict[str, float]:
        scored = self.total[~self.total.isnan()]
        out = {"reward/total": scored.mean().item() if scored.numel() else float("nan"),
               "reward/total_std": scored.std().item() if scored.numel() > 1 else 0.0}
        for name, values in self.components.items():
            ok = values[~values.isnan()]
            out[f"reward/{name}"] = ok.mean().item() if ok.numel() else float("nan")
            out[f"reward/{name}_std"] = ok.std().item() if ok.numel() > 1 else 0.0
            out[f"reward/{name}_applies"] = ok.numel() / max(1, values.numel())
        return {**out, **self.extra}


def close_rewards(specs: list[RewardSpec]) -> None:
    """End the processes rewards started (isolated workers, math-verify pools), so the run's process can exit."""
    for spec in specs:
        close = getattr(getattr(spec, "_fn", None), "close", None)
        if callable(close):
            close()


def check_columns(specs: list[RewardSpec], rows: list[dict]) -> None:
    """Before any work: every row has every column each reward requires. rows: column dicts with a 'row' label."""
    for spec in specs:
        for col in required_columns(spec.load()):
            for r in rows:
                if r.get(col) is None:
                    raise RewardError(f"reward '{spec.key}' needs column '{col}', which {r.get('row', 'a row')} "
                                      f"does not have")


def _check_output(name: str, values, n: int, rows: list[str]) -> list[float | None]:
    if isinstance(values, torch.Tensor) and values.ndim == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward '{name}' returned {type(values).__name__}; expected a list of {n} floats "
                          f"(batch from {rows[0]})")
    if len(values) != n:
        raise RewardError(f"reward '{name}' returned {len(values)} scores for {n} completions "
                          f"(first row of the batch: {rows[0]})")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward '{name}' returned {v!r} (not a number) for {rows[i]}") from None
        if not math.isfinite(v):
            raise RewardError(f"reward '{name}' returned {v} for {rows[i]}")
        out.append(v)
    return out


def _call(spec: RewardSpec, fn, prompts, completions, columns, timeout_s: float):
    """fn's raw output within timeout_s: in its worker (isolate) or on a thread of this process."""
    if isinstance(fn, IsolatedReward):
        return fn.call(prompts, completions, columns, timeout_s)
    return call_with_deadline(fn, prompts, completions, columns, timeout_s, spec.key)


def _run_one(spec: RewardSpec, prompts, completions, columns, rows, timeout_s: float | None = None) \
        -> tuple[list, dict]:
    """One reward's checked scores and metrics on a batch, within timeout_s (None: the spec's)."""
    fn = spec.load()
    for col in required_columns(fn):
        values = columns.get(col)
        missing = range(len(completions)) if values is None else [i for i, v in enumerate(values) if v is None]
        for i in missing:
            raise RewardError(f"reward '{spec.key}' needs column '{col}', which {rows[i]} does not have")
    try:
        raw = _call(spec, fn, prompts, completions, columns, spec.timeout_s if timeout_s is None else timeout_s)
    except RewardError as e:
        raise e if "batch from" in str(e) or " for " in str(e) else type(e)(f"{e} (batch from {rows[0]})")
    except Exception as e:
        raise RewardError(f"reward '{spec.key}' raised {type(e).__name__}: {e} (batch from {rows[0]})") from e
    except SystemExit as e:  # else the run would end as the reward chose, exit 0 with no message and no final/
        raise RewardError(f"reward '{spec.key}' exited the process (sys.exit({e.code!r})) on the batch from "
                          f"{rows[0]}; a reward must return its scores (or raise)") from None
    metrics = {}
    if isinstance(raw, RewardResult):
        raw, metrics = raw.scores, raw.metrics
    return _check_output(spec.key, raw, len(completions), rows), metrics


def _rescore_groups(spec: RewardSpec, prompts, completions, columns, rows, group_size: int, timed_out: bool,
                    values: list, keep: torch.Tensor, errors: dict) -> None:
    """After a failed batch (on_error=skip): score it again one prompt group at a time, filling `values` for the
    groups that score and clearing `keep` for those that fail. After a batch that timed out, the groups share one
    more timeout_s, and those left when it is spent are skipped uncalled: a reward that hangs costs a step at most
    twice its timeout_s, never timeout_s per group."""
    end = time.monotonic() + spec.timeout_s if timed_out and spec.timeout_s > 0 else None
    for s in range(0, len(completions), group_size):
        sl = slice(s, s + group_size)
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            keep[sl] = False
            errors[spec.key] = (f"reward '{spec.key}' timed out on the batch, and re-scoring it group by group used "
                                f"up one more timeout_s={spec.timeout_s} s; the group of {rows[s]} was skipped "
                                f"uncalled")
            continue
        try:
            values[sl], _ = _run_one(spec, prompts[sl], completions[sl], {k: v[sl] for k, v in columns.items()},
                                     rows[sl], left)
        except RewardError as e:
            keep[sl] = False
            errors[spec.key] = str(e)


def score(specs: list[RewardSpec], prompts: list, completions: list[str], columns: dict[str, list],
          rows: list[str], group_size: int = 1, on_error: str = "fail") -> Scores:
    """Run every reward on the batch. columns: name -> one value per completion; rows: a label per completion."""
    n = len(completions)
    keep = torch.ones(n, dtype=torch.bool)
    components: dict[str, list] = {}
    extra: dict[str, float] = {}
    errors: dict[str, str] = {}
    for spec in specs:
        try:
            values, metrics = _run_one(spec, prompts, completions, columns, rows)
        except RewardError as e:
            if on_error != "skip":
                raise
            values, metrics = [None] * n, {}
            errors[spec.key] = str(e)
            _rescore_groups(spec, prompts, completions, columns, rows, group_size, isinstance(e, RewardTimeout),
                            values, keep, errors)
        components[spec.key] = values
        extra.update({f"reward/{spec.key}/{k}": v for k, v in metrics.items()})
    comps = {k: torch.tensor([math.nan if v is None else v for v in vals], dtype=torch.float)
             for k, vals in components.items()}
    total = torch.zeros(n)                                                         # [N]
    scored = torch.zeros(n, dtype=torch.bool)                                      # [N] some reward scored it
    partial = torch.zeros(n, dtype=torch.bool)                                     # [N] a term its siblings have is missing
    for spec in specs:
        comp = comps[spec.key]
        total += spec.weight * torch.nan_to_num(comp, nan=0.0)
        scored |= ~comp.isnan()
        missing = comp.isnan().reshape(-1, group_size)                            # [B, G]
        partial |= (missing & ~missing.all(1, keepdim=True)).reshape(-1)
    partial &= keep
    total = torch.where(scored & ~partial, total, torch.full_like(total, math.nan))  # NaN, never a silent 0
    extra["reward/partially_scored"] = float(partial.sum().item())
    extra["reward/skipped_groups"] = float((~keep).sum().item() // max(1, group_size))
    return Scores(total, comps, extra, keep, errors)
