"""SIGTERM (a scheduler's preemption, `kill PID`) and SIGINT (Ctrl-C) stop a training loop at its next step
boundary, not mid-step.

Without a handler the process dies wherever it is: the last step's work since the previous checkpoint is lost and
nothing says why the run ended (SIGTERM), or a KeyboardInterrupt unwinds through the training code in a screenful of
traceback (SIGINT). With one (`stop_signal`, around a stage's steps: `Run.steps`), the signal only records that it
came; once the current step is done (metrics logged), the run checkpoints that step if it was not due a checkpoint
anyway and raises `Stopped`, which `align` prints as a message and exits with 128 + the signal's number (143, 130),
as a process killed by it would. The same command then resumes from that step: data order, RNG and optimizer state
come back with the checkpoint, so the resumed run matches an uninterrupted one. A second Ctrl-C is a user who will not
wait for the step to end: it raises KeyboardInterrupt at once (nothing more is saved), which `align` prints as one line.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from ..errors import AlignError


class Stopped(AlignError):
    """The run stopped on a signal after a finished, checkpointed step; `exit_status` is the status a process
    killed by that signal has (128 + its number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


@contextlib.contextmanager
def stop_signal(stage: str, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[list[int]]:
    """Within the block, the `signals` only append their number to the yielded list (the loop reads it between
    steps), except a second SIGINT, which raises KeyboardInterrupt; the previous handlers come back after. Outside
    the main thread (where Python cannot set handlers) the list stays empty and the signals keep their handlers."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in received:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        if not received:
            again = "; Ctrl-C again aborts now, unsaved" if signum == signal.SIGINT else ""
            print(f"{stage}: received {signal.Signals(signum).name}: stopping after the current step "
                  f"(checkpointed){again}", file=sys.stderr, flush=True)
        received.append(signum)

    previous = {s: signal.signal(s, record) for s in signals}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
