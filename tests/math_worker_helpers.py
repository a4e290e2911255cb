"""Check and init functions for the math reward's worker-pool tests. Module-level, so they reach the workers by
reference; standard library only, so a worker that imports them starts fast (the test module imports torch)."""

import os
import sys
import time


def slow_start() -> None:
    """A simulated cold start: 3 s more start-up (longer than the tests' per-answer limit), then the math worker's
    own warm-up (the worker has rewards/workers.py loaded under this name; importing rewards would pull torch)."""
    time.sleep(3)
    sys.modules["_align_reward_worker"].warm_up()


def fails_to_start() -> None:
    raise ImportError("no module named 'nope'")


def odd_check(predicted: str, gold: str) -> bool:
    """Equal strings are equal; "hang" never returns, "crash" ends its process, "raise" raises."""
    if predicted == "hang":
        time.sleep(3600)
    if predicted == "crash":
        os._exit(3)
    if predicted == "raise":
        raise ValueError("unparseable")
    return predicted == gold


def torch_imported(predicted: str, gold: str) -> bool:
    return "torch" in sys.modules


def starts_while_no_flag() -> None:
    """Starts unless the file named by $ALIGN_TEST_NO_START exists (a replacement worker that cannot start)."""
    flag = os.environ.get("ALIGN_TEST_NO_START")
    if flag and os.path.exists(flag):
        raise ImportError("no module named 'gone'")


def allocate(predicted: str, gold: str) -> bool:
    """Builds a `predicted`-GiB bytes object (a number that escaped the bounds would build one like it): non-empty?"""
    return len(bytes(int(predicted) << 30)) > 0
