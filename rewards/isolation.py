"""Run a reward in its own worker process: a reward that hangs is stopped at its timeout, one that crashes its
process (segfault, os._exit, out of memory) is reported, and neither takes the trainer down with it.

The worker rebuilds the reward from its spec (name, args), so factories and closures need not be picklable; it
keeps the built reward between calls. The worker is started and the reward built before a call's timeout starts.
On a timeout or a crash the worker is killed and a fresh one starts next time.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import threading
from concurrent.futures.process import BrokenProcessPool

from .calling import RewardError, RewardTimeout, build_reward, call_reward, required_columns
from .registry import get_reward
from .workers import watch_parent

_BUILT: dict = {}
BUILD_TIMEOUT_S = 300.0  # starting a worker and building a factory reward in it (imports, a reward model)


def kill_pool(pool: cf.ProcessPoolExecutor | None) -> None:
    """End a process pool's workers now (a stuck task cannot be cancelled otherwise)."""
    if pool is not None:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)


def _built(spec: dict):
    """The worker's reward for spec {name, args}, built on first use and kept."""
    key = repr(sorted((k, repr(v)) for k, v in spec.items()))
    if key not in _BUILT:
        _BUILT[key] = build_reward(spec["name"], spec.get("args", {}))
    return _BUILT[key]


def _init_worker(parent: int) -> None:
    """In the worker: Ctrl-C, which a terminal sends to the whole process group, is the trainer's to act on (it stops
    at a step boundary and then ends this worker), so the worker ignores it, and ends by itself once the trainer is
    gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=watch_parent, args=(parent,), daemon=True).start()


def _score_in_worker(spec: dict, prompts, completions, columns):
    return call_reward(_built(spec), prompts, completions, columns)


def _columns_in_worker(spec: dict) -> list[str]:
    return list(required_columns(_built(spec)))


def _close_in_worker() -> None:
    for fn in _BUILT.values():
        close = getattr(fn, "close", None)
        if callable(close):
            close()
    _BUILT.clear()


class IsolatedReward:
    def __init__(self, spec: dict, label: str, timeout_s: float):
        self.spec, self.label, self.timeout_s = spec, label, timeout_s
        self._pool: cf.ProcessPoolExecutor | None = None

    def _kill(self) -> None:
        kill_pool(self._pool)
        self._pool = None

    def _submit(self, fn, *args):
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                                initargs=(os.getpid(),))
        return self._pool.submit(fn, *args)

    @property
    def required_columns(self) -> list[str]:
        """The columns the reward built in the worker asks for (a factory's only once it is built), so the column
        check before any work covers isolated rewards too."""
        if getattr(self, "_columns", None) is None:
            plain = get_reward(self.spec["name"])
            if not getattr(plain, "is_factory", False):  # a plain function: its signature says it
                self._columns = list(required_columns(plain))
                return self._columns
            self._columns = self._build()  # a factory: build it in the worker
        return self._columns

    def _build(self) -> list[str]:
        """Start the worker and build the reward in it, with the build's own limit (start-up included: a cold
        start imports torch and the reward's module, seconds on a busy machine); the reward's columns."""
        try:
            return self._submit(_columns_in_worker, self.spec).result(timeout=max(BUILD_TIMEOUT_S, self.timeout_s))
        except cf.TimeoutError:
            self._kill()
            raise RewardError(f"reward '{self.label}' timed out while being built in its worker") from None
        except BrokenProcessPool:
            self._kill()
            raise RewardError(f"reward '{self.label}' crashed its worker while being built") from None

    def close(self) -> None:
        """Let the worker end what it started (e.g. math-verify's processes), then end the worker."""
        if self._pool is not None:
            try:
                self._pool.submit(_close_in_worker).result(timeout=10)
            except Exception:
                pass
            self._kill()

    def __call__(self, prompts, completions, **columns):
        return self.call(prompts, completions, columns, self.timeout_s)

    def call(self, prompts, completions, columns: dict, timeout_s: float):
        """The reward's output on a batch, scored in the worker within timeout_s (<= 0: no limit); past it the
        worker is killed and RewardTimeout raised."""
        if self._pool is None:  # cold: start and build outside this call's timeout
            self._build()
        future = self._submit(_score_in_worker, self.spec, prompts, completions, columns)
        try:
            return future.result(timeout=timeout_s if timeout_s > 0 else None)
        except cf.TimeoutError:
            self._kill()
            raise RewardTimeout(f"reward '{self.label}' timed out after {timeout_s} s (its worker was stopped)") \
                from None
        except BrokenProcessPool:
            self._kill()
            raise RewardError(f"reward '{self.label}' crashed its worker process")
