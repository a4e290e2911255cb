"""Reward functions by name.

A reward is a plain function `(prompts, completions, **columns) -> list[float | None]`: one score per completion,
None where it does not apply. Register one with `@reward("name")`; `get_reward(spec)` finds it by registered name,
by `package.module:function`, or by an entry point in the group `align.rewards` (so a pip-installed package adds
rewards).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

RewardFn = Callable[..., list]
ENTRY_POINT_GROUP = "align.rewards"
_REGISTRY: dict[str, RewardFn] = {}


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register `fn` under `name`."""

    def register(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = fn
        fn.reward_name = name
        return fn

    return register


def registered() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    importlib.import_module("rewards.math")


def get_reward(spec: str) -> RewardFn:
    """Resolve a reward by registered name, `module:function`, or entry point name."""
    _load_builtins()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"reward {spec!r}: cannot import {attr!r} from {module!r} ({e})") from None
        if not callable(fn):
            raise KeyError(f"reward {spec!r} is not callable")
        return fn
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            return ep.load()
    raise KeyError(f"unknown reward {spec!r}; registered: {', '.join(sorted(_REGISTRY))}; or use module:function, "
                   f"or install a package with an '{ENTRY_POINT_GROUP}' entry point")
