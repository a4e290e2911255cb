"""Score completions with several named rewards and combine them: total_i = Σ_k c_k · r_k,i.

Each reward is called once per batch with the prompts, the completions and the rows' other columns (one entry per
completion). Its output is checked: one score per completion, each a finite float or None (the reward does not
apply to that row: excluded from the component's statistics, and from the total). A reward that raises, returns
the wrong number of scores or a non-finite value, or needs a column a row lacks, stops the run with a `RewardError`
naming the reward and the row; nothing is silently turned into 0.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch

from .registry import get_reward


class RewardError(RuntimeError):
    """A reward failed; the message names the reward and the data row."""


@dataclasses.dataclass
class RewardSpec:
    name: str
    weight: float = 1.0

    def load(self):
        return get_reward(self.name)


@dataclasses.dataclass
class Scores:
    total: torch.Tensor                      # [N] weighted sum over the components that apply
    components: dict[str, torch.Tensor]      # name -> [N], NaN where the reward returned None

    def metrics(self) -> dict[str, float]:
        out = {"reward/total": self.total.mean().item(), "reward/total_std": self.total.std().item()
               if self.total.numel() > 1 else 0.0}
        for name, values in self.components.items():
            ok = values[~values.isnan()]
            out[f"reward/{name}"] = ok.mean().item() if ok.numel() else float("nan")
            out[f"reward/{name}_std"] = ok.std().item() if ok.numel() > 1 else 0.0
        return out


def _required_columns(fn) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("prompts", "completions")]


def _check_output(name: str, values, n: int, rows: list[str]) -> list[float | None]:
    if not isinstance(values, (list, tuple)) and not (isinstance(values, torch.Tensor) and values.ndim == 1):
        raise RewardError(f"reward '{name}' returned {type(values).__name__}; expected a list of {n} floats")
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
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


def check_columns(specs: list[RewardSpec], rows: list[dict]) -> None:
    """Before any work: every row has every column each reward requires. rows: column dicts with a 'row' label."""
    for spec in specs:
        for col in _required_columns(spec.load()):
            for r in rows:
                if r.get(col) is None:
                    raise RewardError(f"reward '{spec.name}' needs column '{col}', which {r.get('row', 'a row')} "
                                      f"does not have")


def score(specs: list[RewardSpec], prompts: list[str], completions: list[str], columns: dict[str, list],
          rows: list[str]) -> Scores:
    """Run every reward on the batch. columns: name -> one value per completion; rows: a label per completion."""
    n = len(completions)
    total = torch.zeros(n)
    components = {}
    for spec in specs:
        fn = spec.load()
        for col in _required_columns(fn):
            values = columns.get(col)
            missing = range(n) if values is None else [i for i, v in enumerate(values) if v is None]
            for i in missing:
                raise RewardError(f"reward '{spec.name}' needs column '{col}', which {rows[i]} does not have")
        try:
            raw = fn(prompts=prompts, completions=completions, **columns)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward '{spec.name}' raised {type(e).__name__}: {e} (batch from {rows[0]})") from e
        values = _check_output(spec.name, raw, n, rows)
        comp = torch.tensor([math.nan if v is None else v for v in values])                   # [N]
        components[spec.name] = comp
        total += spec.weight * torch.nan_to_num(comp, nan=0.0)
    return Scores(total, components)
