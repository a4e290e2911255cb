"""A warm pool of worker processes for checks that can hang (math-verify's symbolic equivalence).

Each task gets a wall-clock limit that starts when a ready, idle worker takes it, so a worker's start-up (imports,
an init function) never counts against an answer. Workers start once and serve call after call. A task past its
limit has only its own worker killed (scored as "timeout") and replaced; a worker that dies takes only its task
("died"); the other workers keep going, and tasks wait for a ready worker, never for a start-up deadline.

Workers are fresh interpreters (`python -c`) that load this file by path, so they import the standard library, the
init and check functions' modules and nothing else: not `rewards/__init__` or align, which import torch (~2-4 s of a
cold start each time). multiprocessing's spawn would also re-run the parent's main script (the `align` command
imports torch). This file therefore imports only the standard library; `verify_answer` and `warm_up` live here so a
worker gets them without importing the `rewards` package. Functions are sent by reference (module-level, picklable),
as with spawn. A worker ends when its parent closes the pipe, and within a second of its parent's death.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait

STARTUP_S = 300.0  # a worker's start-up (imports, init function): past this it is an error, never a silent None

_BOOT = ("import importlib.util, sys\n"
         "spec = importlib.util.spec_from_file_location('_align_reward_worker', sys.argv[1])\n"
         "mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
         "spec.loader.exec_module(mod)\n"
         "mod._serve(int(sys.argv[2]))\n")


def verify_answer(predicted: str, gold: str) -> bool:
    """math-verify equivalence without its signal-based timeouts (safe off the main thread)."""
    from math_verify import parse, verify

    def wrap(s: str) -> str:
        return s if "$" in s or "\\boxed" in s else f"${s}$"

    gold_parsed = parse(wrap(gold), parsing_timeout=None)
    pred_parsed = parse(wrap(predicted), parsing_timeout=None)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _not_timeout_notice(record) -> bool:
    return not record.getMessage().startswith("Timeout is disabled")  # the worker's limit is the timeout


_WARM_UP = [("\\frac{1}{2}", "0.5"), ("2\\sqrt{2}", "\\sqrt{8}"), ("x^2 + 2x + 1", "(x+1)^2"),
            ("\\{1, 2\\}", "\\{2, 1\\}")]


def warm_up() -> None:
    """A math worker's init: import math-verify (sympy, the LaTeX parser) and run a few checks, so sympy's first-use
    costs (simplification, radicals, sets: ~0.5 s on a busy machine) are paid at start-up, not by an answer."""
    import logging

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_not_timeout_notice)
    for predicted, gold in _WARM_UP:
        verify_answer(predicted, gold)


# ---- the worker side -------------------------------------------------------------------------------------------

def _ref(fn):
    """How a function travels to a worker: by name when it is defined here (no package import there), else pickled
    by reference (a script's own functions: re-run the script in the worker, as spawn does)."""
    if fn is None:
        return None
    if getattr(fn, "__module__", None) == __name__ and globals().get(fn.__qualname__) is fn:
        return ("here", fn.__qualname__)
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and getattr(main, "__file__", None):
        return ("main", os.path.abspath(main.__file__), fn.__qualname__)
    return ("pickle", pickle.dumps(fn))


def _resolve(ref):
    if ref is None:
        return None
    if ref[0] == "here":
        return globals()[ref[1]]
    if ref[0] == "main":
        import runpy

        return runpy.run_path(ref[1], run_name="__mp_main__")[ref[2]]
    return pickle.loads(ref[1])


def watch_parent(parent: int) -> None:
    """In a worker (on a daemon thread): exit once `parent` is gone, as a hung task never reads its pipe's EOF."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _serve(fd: int) -> None:
    conn = Connection(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C (sent to the whole terminal group) is the trainer's to act on
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        setup = conn.recv()
        sys.path[:] = setup["path"]
        init, check = _resolve(setup["init"]), _resolve(setup["check"])
        if init is not None:
            init()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        i, args = task
        try:
            result = ("ok", check(*args))
        except Exception as e:  # noqa: BLE001 - the caller decides what a raising check means
            result = ("raised", f"{type(e).__name__}: {e}")
        conn.send((i, *result))


# ---- the parent side -------------------------------------------------------------------------------------------

class _Worker:
    def __init__(self, setup: dict):
        mine, theirs = mp.Pipe()  # a socket pair on POSIX
        fd = theirs.fileno()
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, os.path.abspath(__file__), str(fd)],
                                     pass_fds=(fd,), stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = mine
        self.conn.send(setup)
        self.started = time.monotonic()
        self.ready = False
        self.task: tuple[int, float] | None = None  # (task index, deadline)

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()  # reaped: no zombie
        self.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.kill()
    workers.clear()


class WorkerPool:
    """`workers` warm processes that run `check_fn(*task)`, each task with a `timeout_s` wall-clock limit counted
    from when a ready worker takes it. `run(tasks)` returns per task (kind, value): ("ok", result),
    ("raised", message), ("timeout", None) or ("died", exit code). Safe to call from several threads (one run at a
    time). `close()` ends the workers (also done when the pool is garbage-collected or the interpreter exits)."""

    def __init__(self, check_fn, workers: int = 2, timeout_s: float = 5.0, init_fn=None,
                 startup_s: float = STARTUP_S, name: str = "worker pool"):
        if workers < 1:
            raise ValueError(f"{name}: workers must be >= 1, got {workers}")
        self.n, self.timeout_s, self.startup_s, self.name = workers, timeout_s, startup_s, name
        self._setup = {"check": _ref(check_fn), "init": _ref(init_fn)}
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.timeouts = self.crashes = self.restarts = 0
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def start(self) -> None:
        """Start the missing workers (returns at once; they get ready in the background)."""
        while len(self._workers) < self.n:
            self._workers.append(_Worker({**self._setup, "path": list(sys.path)}))

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        self.restarts += 1
        self.start()

    def _startup_failed(self, why: str) -> RuntimeError:
        return RuntimeError(f"{self.name}: a worker process {why}")

    def run(self, tasks: list[tuple]) -> list[tuple[str, object]]:
        with self._lock:
            try:
                return self._run(tasks)
            except BaseException:
                _kill_all(self._workers)
                raise

    def _run(self, tasks: list[tuple]) -> list[tuple[str, object]]:
        out: list = [None] * len(tasks)
        todo = deque(range(len(tasks)))
        self.start()
        while todo or any(w.task for w in self._workers):
            for w in list(self._workers):
                if w.ready and w.task is None and todo:
                    i = todo.popleft()
                    try:
                        w.conn.send((i, tasks[i]))
                    except OSError:  # it died while idle: the task waits for its replacement
                        todo.appendleft(i)
                        self._replace(w)
                        continue
                    w.task = (i, time.monotonic() + self.timeout_s)
            busy = [w for w in self._workers if w.task]
            starting = [w for w in self._workers if not w.ready]
            deadlines = [w.task[1] for w in busy] + [w.started + self.startup_s for w in starting]
            by_conn = {w.conn: w for w in busy + starting}
            for conn in wait(list(by_conn), max(0.0, min(deadlines) - time.monotonic())):
                w = by_conn[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # the worker died
                    code = w.proc.wait()
                    if w.task is None:
                        raise self._startup_failed(f"exited with code {code} while starting") from None
                    out[w.task[0]] = ("died", code)
                    self.crashes += 1
                    self._replace(w)
                    continue
                if msg[0] == "ready":
                    w.ready = True
                elif msg[0] == "error":
                    raise self._startup_failed(f"failed to start:\n{msg[1]}")
                else:
                    i, kind, value = msg
                    out[i] = (kind, value)
                    w.task = None
            now = time.monotonic()
            for w in list(self._workers):
                if w.task and w.task[1] <= now:  # past its limit: only this worker goes
                    out[w.task[0]] = ("timeout", None)
                    self.timeouts += 1
                    self._replace(w)
                elif not w.ready and w.started + self.startup_s <= now:
                    raise self._startup_failed(f"did not start within {self.startup_s:g} s")
        return out

    def close(self) -> None:
        with self._lock:
            _kill_all(self._workers)
