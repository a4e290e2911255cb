"""Rollouts generated ahead of the policy (rollout.max_off_policy_steps = L > 0): step k+1's completions are sampled
while step k trains.

A producer thread walks the steps in order; it may start step t's batch once the policy the server holds is at
least version t − L (version = updates applied; the trainer at step t holds version t), so a batch is at most L
versions old when the trainer takes it. Each batch records the version the server held when its requests started:
weights pushed while they run (the sync pauses the server, pushes, drops every cached KV, resumes) make later tokens
newer, never older, so that version is the oldest any of its tokens saw. Groups staler than L are dropped and
counted (rollout/stale_dropped); by the rule above none should be. Prompts are a function of (seed, step, process),
so the producer draws exactly the prompts the synchronous loop would.

Only the sampling runs ahead: rewards are scored on the trainer's thread when it takes the batch (reward models share
the trainer's device, and reward code need not be thread-safe). The loss needs nothing new: ρ = π_θ / π_old uses
the trainer's own recomputed π_old, and the truncated weight min(π_old / π_sampler, C) (tis_cap) corrects for the
sampler being L versions behind (rollout/kl_sampler grows with it).

Resume: nothing of the producer is saved; batches in flight when a run stops are lost and regenerated from the
resumed policy (its version is the resumed step).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from ..rollout.protocol import Rollouts, SamplingConfig


@dataclasses.dataclass
class Batch:
    step: int            # the step (0-based) it is for
    picked: list         # this process's prompt rows
    rollouts: Rollouts
    version: int         # the policy version the server held when its requests started
    started: float       # time.monotonic() when generation started / ended
    ended: float


class RolloutsAhead:
    """The producer thread and the batches it made, by step."""

    def __init__(self, engine, prompts_for: Callable[[int], list], start: int, steps: int, lag: int, n: int,
                 sampling: SamplingConfig, sample: Callable[[list, int, SamplingConfig], Rollouts] | None = None):
        """`sample(rows, n, sampling)`: how a batch is sampled (default: one engine.generate call; multi-turn
        rollouts pass their tool loop)."""
        self.engine, self.prompts_for, self.lag, self.n, self.sampling = engine, prompts_for, lag, n, sampling
        self.sample = sample or (lambda rows, n, sampling: engine.generate([r.messages for r in rows], n=n,
                                                                           sampling=sampling))
        self.version = start               # the version the trainer has pushed (updates applied)
        self.batches: dict[int, Batch] = {}
        self.error: BaseException | None = None
        self.stopped = False
        self.cond = threading.Condition()
        self.engine.pause_for_sync = True  # weights may now arrive while requests run
        self.thread = threading.Thread(target=self._produce, args=(start, steps), name="align-rollouts-ahead",
                                       daemon=True)
        self.thread.start()

    def _produce(self, start: int, steps: int) -> None:
        try:
            for step in range(start, steps):
                with self.cond:  # at most L versions ahead of the pushed policy, at most L + 1 batches waiting
                    self.cond.wait_for(lambda t=step: self.stopped or (t - self.version <= self.lag
                                                                       and len(self.batches) <= self.lag))
                    if self.stopped:
                        return
                    version = self.version
                picked = self.prompts_for(step)
                t0 = time.monotonic()
                rollouts = self.sample(picked, self.n, self.sampling)
                with self.cond:
                    self.batches[step] = Batch(step, picked, rollouts, version, t0, time.monotonic())
                    self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 (raised on the trainer's thread by take)
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def take(self, step: int) -> tuple[Batch, dict[str, float]]:
        """Step `step`'s batch (waiting for it) and the producer's metrics for it."""
        asked = time.monotonic()
        with self.cond:
            self.cond.wait_for(lambda: step in self.batches or self.error is not None)
            if step not in self.batches:
                raise self.error
            batch = self.batches.pop(step)
            queued = len(self.batches)
            self.cond.notify_all()
        overlap = max(0.0, min(batch.ended, asked) - batch.started)  # generated while the trainer was busy
        return batch, {"rollout/staleness": float(self.version - batch.version), "rollout/queue_len": float(queued),
                       "perf/overlap_s": overlap, "perf/wait_s": max(0.0, batch.ended - asked)}

    def synced(self, version: int) -> None:
        """The trainer pushed `version` (call after engine.sync_weights)."""
        with self.cond:
            self.version = version
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=5)  # a request in flight finishes or times out on its own (daemon thread)
        self.engine.pause_for_sync = False
