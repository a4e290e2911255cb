"""How a reward is built and called, shared by the in-process path (`combine`) and the worker process
(`isolation`), so neither imports the other's module."""

from __future__ import annotations

import asyncio
import inspect

from .registry import get_reward


class RewardError(RuntimeError):
    """A reward failed; the message names the reward and the data row."""


def build_reward(name: str, args: dict):
    """The scoring function registered as `name` (a factory is called once with `args`)."""
    fn = get_reward(name)
    if getattr(fn, "is_factory", False):
        try:
            return fn(**args)
        except TypeError as e:
            raise KeyError(f"reward {name!r} takes settings in 'args': {e}") from None
    if args:
        raise KeyError(f"reward {name!r} takes no 'args' (got {sorted(args)})")
    return fn


def required_columns(fn) -> list[str]:
    """The row columns a reward asks for: its `required_columns`, else its signature's parameters without a
    default (besides prompts and completions)."""
    if hasattr(fn, "required_columns"):
        return fn.required_columns
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("prompts", "completions")]


def call_reward(fn, prompts, completions, columns):
    """fn's raw output on a batch (an async reward is run to completion)."""
    out = fn(prompts=prompts, completions=completions, **columns)
    if inspect.isawaitable(out):
        out = asyncio.run(out)
    return out
