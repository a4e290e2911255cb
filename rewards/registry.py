"""Reward functions by name.

A reward is a plain function `(prompts, completions, **columns) -> list[float | None]` (or an `async def` one): one
score per completion, None where it does not apply. It may return a `RewardResult` to report extra metrics (logged
as `reward/<name>/<metric>`). Register one with `@reward("name")`. A reward that needs settings (a model path, a
length limit) is a factory registered with `@reward_factory("name")`: called once with the recipe's `args`, it
returns the scoring function.

`get_reward(spec)` finds a reward by registered name, by `package.module:function` (a module on sys.path, or else in
the working directory: `my_rewards.py` beside the recipe you run from needs no PYTHONPATH), or by an entry point in
the group `align.rewards` (so a pip-installed package adds rewards).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

RewardFn = Callable[..., list]
ENTRY_POINT_GROUP = "align.rewards"
BUILTIN_MODULES = ("rewards.math", "rewards.rules", "rewards.code", "rewards.model", "rewards.judge",
                   "rewards.environment")
_REGISTRY: dict[str, RewardFn] = {}


@dataclasses.dataclass
class RewardResult:
    scores: list                                                  # one float or None per completion
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def _register(name: str, fn, factory: bool):
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].__module__}")
    _REGISTRY[name] = fn
    fn.reward_name = name
    fn.is_factory = factory
    return fn


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register the scoring function `fn` under `name`."""
    return lambda fn: _register(name, fn, factory=False)


def reward_factory(name: str) -> Callable:
    """Decorator: register a factory `(**args) -> scoring function` under `name`."""
    return lambda fn: _register(name, fn, factory=True)


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def registered() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _import_from_cwd(module: str):
    """`import module`, found on sys.path or else in the working directory (`python -m` puts it on sys.path, the
    `align` script does not): the directory is then appended to sys.path, after everything installed, so a module
    there never shadows an installed one, and isolated reward workers (which copy sys.path) find it too."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        importlib.invalidate_caches()
        return importlib.import_module(module)


def get_reward(spec: str) -> RewardFn:
    """Resolve a reward (or reward factory) by registered name, `module:function`, or entry point name."""
    _load_builtins()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(_import_from_cwd(module), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"reward {spec!r}: cannot import {attr!r} from {module!r} ({e}; looked on sys.path and "
                           f"in the working directory {os.getcwd()})") from None
            raise KeyError(f"reward {spec!r}: cannot import {attr!r} from {module!r} ({e})") from None
        except (Exception, SystemExit) as e:  # the module's own code failed while it was imported
            raise KeyError(f"reward {spec!r}: importing module {module!r} raised {type(e).__name__}: {e} (fix that "
                           f"module; it must import without error)") from None
        if not callable(fn):
            raise KeyError(f"reward {spec!r} is not callable")
        return fn
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            return ep.load()
    raise KeyError(f"unknown reward {spec!r}; registered: {', '.join(sorted(_REGISTRY))}; or use module:function, "
                   f"or install a package with an '{ENTRY_POINT_GROUP}' entry point")
