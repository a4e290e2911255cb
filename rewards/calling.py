"""How a reward is built and called, shared by the in-process path (`combine`) and the worker process
(`isolation`), so neither imports the other's module."""

from __future__ import annotations

import asyncio
import inspect
import threading

import torch

from .registry import get_reward


class RewardError(RuntimeError):
    """A reward failed; the message names the reward and the data row."""


class RewardTimeout(RewardError):
    """A reward call ran past its timeout_s (in process or in its worker)."""


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


class _Late(Exception):
    """An async reward was cancelled at its deadline (its own TimeoutError stays its own error)."""


def call_reward(fn, prompts, completions, columns, timeout_s: float = 0.0):
    """fn's raw output on a batch (an async reward is run to completion, or cancelled after timeout_s when > 0)."""
    out = fn(prompts=prompts, completions=completions, **columns)
    if inspect.isawaitable(out):
        out = asyncio.run(_within(out, timeout_s))
    return out


async def _within(awaitable, timeout_s: float):
    """The awaitable's result; past timeout_s (> 0) it is cancelled and _Late raised (asyncio.wait_for would raise
    the same TimeoutError a reward's own request can raise)."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout_s if timeout_s > 0 else None)
    if not done:
        task.cancel()
        raise _Late
    return task.result()


def call_with_deadline(fn, prompts, completions, columns, timeout_s: float, label: str):
    """call_reward under a deadline in this process: a call past `timeout_s` seconds is a RewardError naming the
    reward and the limit, never a hang (timeout_s <= 0: no limit, called on this thread).

    Python cannot stop a running function from outside, so the call runs on a daemon thread joined with the
    deadline; a late sync call is abandoned there and runs on until it returns by itself (holding its memory and
    sharing the GIL; `isolate: true` runs a reward in a worker process that is killed instead). A late async reward
    is cancelled, so it does end. The caller's grad mode and CUDA device (both per thread) are carried over, so a
    reward model scores as it would on the caller's thread; a reward that needs the main thread (signal handlers)
    takes timeout_s: 0 or isolate: true. Whatever the call raises (SystemExit and KeyboardInterrupt too) is raised
    here."""
    if timeout_s <= 0:
        return call_reward(fn, prompts, completions, columns)
    result: dict = {}
    grad = torch.is_grad_enabled()
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            with torch.set_grad_enabled(grad):
                result["value"] = call_reward(fn, prompts, completions, columns, timeout_s)
        except _Late:
            result["late"] = True
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which decides
            result["error"] = e

    worker = threading.Thread(target=run, name=f"reward {label}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive() or result.get("late"):
        raise RewardTimeout(f"reward '{label}' timed out after {timeout_s} s (its timeout_s; the call was abandoned "
                            f"on its thread)")
    if "error" in result:
        raise result["error"]
    return result["value"]
