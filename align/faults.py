"""Fault injection for the kill-and-resume tests: with ALIGN_FAULT="phase:step" set, the process SIGKILLs itself when
a run reaches that phase of that step. Phases: generation, scoring, update (GRPO steps), checkpoint (inside the
checkpoint write, after some files are written and before the rename). Unset in normal use: then a no-op."""

from __future__ import annotations

import os
import signal


def fault_point(phase: str, step: int) -> None:
    if os.environ.get("ALIGN_FAULT") == f"{phase}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
