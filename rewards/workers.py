"""A warm pool of worker processes for checks that can hang (math-verify's symbolic equivalence).

A call waits until every worker is ready (imports, an init function) before its clock starts, so a cold start never
counts against an answer. Then each task gets a wall-clock limit that starts when a ready, idle worker takes it, and
the call as a whole has one deadline (`batch_timeout_s`): whatever runs past it is cut and whatever has not started
is not, so a batch of tasks that all hang ends within that deadline. Workers start once and serve call after call. A
task past its limit has only its own worker killed (scored as "timeout") and replaced; a worker that dies takes only
its task ("died"); the other workers keep going. A replacement that cannot start ends the call: its unfinished tasks
are "failed" (a pool that never started is an error instead).

`check_completion` is the math reward's check: the whole of a completion's parsing (extracting the final answer,
bounding it, comparing numbers, math-verify) happens here, in the timed worker; the trusted process only caps a
completion's length and hands it over.

Workers are fresh interpreters (`python -c`) that load this file by path, so they import the standard library, the
init and check functions' modules and nothing else: not `rewards/__init__` or align, which import torch (~2-4 s of a
cold start each time). multiprocessing's spawn would also re-run the parent's main script (the `align` command
imports torch). This file therefore imports only the standard library; `verify_answer`, `check_completion` and
`warm_up` live here (loading rewards/answers.py by path) so a worker gets them without importing the `rewards`
package. Functions are sent by reference (module-level, picklable), as with spawn. A worker ends when its parent
closes the pipe, and within a second of its parent's death.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import resource
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
MEMORY_BYTES = 2 << 30  # a math worker's address space: a number that escapes the bounds is a MemoryError there

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


def _answers():
    """rewards/answers.py: the package's module where this file was imported as part of it, else (a worker, which
    loads this file by path) the file beside this one, loaded by path too: never the `rewards` package (torch)."""
    if __package__:
        from . import answers

        return answers
    import importlib.util

    name = "_align_reward_answers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "answers.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def check_completion(completion: str, gold: str) -> bool:
    """The math reward's check of one completion, run in a worker: its final answer (`extract_answer`) is wrong if
    missing or not `bounded`, right if it is the same number or string as `gold`, wrong if both are different
    numbers, else math-verify decides."""
    answers = _answers()
    predicted = answers.extract_answer(completion)
    if predicted is None or not answers.bounded(predicted):
        return False
    if answers.same_answer(predicted, gold):
        return True
    if answers.number(predicted) is not None and answers.number(gold) is not None:
        return False
    return verify_answer(predicted, gold)


def _not_timeout_notice(record) -> bool:
    return not record.getMessage().startswith("Timeout is disabled")  # the worker's limit is the timeout


_WARM_UP = [("\\frac{1}{2}", "0.5"), ("2\\sqrt{2}", "\\sqrt{8}"), ("x^2 + 2x + 1", "(x+1)^2"),
            ("\\{1, 2\\}", "\\{2, 1\\}")]


def limit_memory() -> None:
    """Cap this process's address space at MEMORY_BYTES (never raising a lower limit): in a worker, a number that
    escapes the answer bounds is a MemoryError there (a check that raised: wrong), not the host's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(MEMORY_BYTES, hard)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def warm_up() -> None:
    """A math worker's init: `limit_memory`, import math-verify (sympy, the LaTeX parser) and run a few checks, so
    sympy's first-use costs (simplification, radicals, sets: ~0.5 s on a busy machine) are paid at start-up, not by
    an answer."""
    import logging

    limit_memory()
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_not_timeout_notice)
    for predicted, gold in _WARM_UP:
        check_completion(f"\\boxed{{{predicted}}}", gold)


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


class StartupError(RuntimeError):
    """A worker process could not start (its init raised, it exited, or it ran past startup_s)."""


class WorkerPool:
    """`workers` warm processes that run `check_fn(*task)`. `run(tasks)` waits for every worker to be ready, then
    gives each task a `timeout_s` wall-clock limit counted from when a worker takes it, and the call one deadline,
    `batch_timeout_s` (None: none) after that. Per task (kind, value): ("ok", result), ("raised", message),
    ("timeout", None) (cut at its limit or at the call's deadline), ("timeout", "not started") (the call's deadline
    came first), ("died", exit code) or ("failed", message) (a replacement worker could not start). A pool whose
    workers never started raises StartupError instead. Safe to call from several threads (one run at a time).
    `close()` ends the workers (also done when the pool is garbage-collected or the interpreter exits)."""

    def __init__(self, check_fn, workers: int = 2, timeout_s: float = 5.0, init_fn=None,
                 startup_s: float = STARTUP_S, name: str = "worker pool", batch_timeout_s: float | None = None):
        if workers < 1:
            raise ValueError(f"{name}: workers must be >= 1, got {workers}")
        self.n, self.timeout_s, self.startup_s, self.name = workers, timeout_s, startup_s, name
        self.batch_timeout_s = batch_timeout_s
        self._setup = {"check": _ref(check_fn), "init": _ref(init_fn)}
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.timeouts = self.crashes = self.restarts = self.failures = 0
        self.started_once = False  # every worker was ready once: a later start-up failure fails a call, not the pool
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

    def _started(self, w: _Worker) -> None:
        """Read a starting worker's first message: ready, or a StartupError."""
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            raise StartupError(f"{self.name}: a worker process exited with code {w.proc.wait()} while starting") \
                from None
        if msg[0] == "error":
            raise StartupError(f"{self.name}: a worker process failed to start:\n{msg[1]}")
        w.ready = True

    def _check_startup(self, now: float) -> None:
        for w in self._workers:
            if not w.ready and w.started + self.startup_s <= now:
                raise StartupError(f"{self.name}: a worker process did not start within {self.startup_s:g} s")

    def warm(self) -> None:
        """Start the missing workers and wait until all are ready (StartupError if one cannot start)."""
        self.start()
        while starting := [w for w in self._workers if not w.ready]:
            left = min(w.started + self.startup_s for w in starting) - time.monotonic()
            for conn in wait([w.conn for w in starting], max(0.0, left)):
                self._started(next(w for w in starting if w.conn is conn))
            self._check_startup(time.monotonic())
        self.started_once = True

    def run(self, tasks: list[tuple]) -> list[tuple[str, object]]:
        with self._lock:
            out: list = [None] * len(tasks)
            try:
                self.warm()  # before the clock: a cold start never counts against a task
                self._run(tasks, out)
            except StartupError as e:
                _kill_all(self._workers)  # the next call starts fresh ones
                if not self.started_once:
                    raise
                self.failures += 1
                return [o if o is not None else ("failed", str(e)) for o in out]
            except BaseException:
                _kill_all(self._workers)
                raise
            return out

    def _run(self, tasks: list[tuple], out: list) -> None:
        todo = deque(range(len(tasks)))
        end = math.inf if self.batch_timeout_s is None else time.monotonic() + self.batch_timeout_s
        while todo or any(w.task for w in self._workers):
            now = time.monotonic()
            if now >= end:  # the call's one deadline: what runs is cut, what waits is not started
                for w in [w for w in self._workers if w.task]:
                    out[w.task[0]] = ("timeout", None)
                    self.timeouts += 1
                    self._replace(w)  # the replacement gets ready in the background, for the next call
                for i in todo:
                    out[i] = ("timeout", "not started")
                return
            for w in list(self._workers):
                if w.ready and w.task is None and todo:
                    i = todo.popleft()
                    try:
                        w.conn.send((i, tasks[i]))
                    except OSError:  # it died while idle: the task waits for its replacement
                        todo.appendleft(i)
                        self._replace(w)
                        continue
                    w.task = (i, min(now + self.timeout_s, end))
            busy = [w for w in self._workers if w.task]
            starting = [w for w in self._workers if not w.ready]
            deadlines = [end] + [w.task[1] for w in busy] + [w.started + self.startup_s for w in starting]
            by_conn = {w.conn: w for w in busy + starting}
            for conn in wait(list(by_conn), max(0.0, min(deadlines) - time.monotonic()) if by_conn else 0.0):
                w = by_conn[conn]
                if not w.ready:
                    self._started(w)
                    continue
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # the worker died on its task
                    out[w.task[0]] = ("died", w.proc.wait())
                    self.crashes += 1
                    self._replace(w)
                    continue
                i, kind, value = msg
                out[i] = (kind, value)
                w.task = None
            now = time.monotonic()
            for w in list(self._workers):
                if w.task and w.task[1] <= now < end:  # past its own limit: only this worker goes
                    out[w.task[0]] = ("timeout", None)
                    self.timeouts += 1
                    self._replace(w)
            self._check_startup(now)

    def close(self) -> None:
        with self._lock:
            _kill_all(self._workers)
