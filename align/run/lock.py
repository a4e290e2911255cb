"""One process per run directory: an OS lock on DIR/.align-lock, taken before the run writes anything there.

Two `align sft` (or `grpo`, `rm`, `run`) started on the same directory would otherwise both train, log every step
twice and overwrite each other's checkpoints. The lock is `fcntl.flock` on a file inside the directory: the OS
releases it when the process ends, however it ends (exit, exception, SIGKILL), so a killed run never leaves a stale
lock behind. The holder writes its pid, host and start time into the file after locking, so a second run is refused
naming them. Under accelerate only the main process locks (`rundir.claim_all`); the others learn its outcome.

A process keeps its locks (one open descriptor each) until it ends or `unlock_dir`; taking a lock it already holds
is a no-op, so `align run`'s stages and repeated calls in one Python session are not refused by themselves.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import ConfigError

LOCK = ".align-lock"
_HELD: dict[str, int] = {}  # resolved directory -> the open descriptor that holds its lock


def _holder(fd: int) -> str:
    """'pid N on host H (since T)' from a lock file's contents, as its holder wrote them."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "a process that has not written its pid yet"
    text = f"pid {info['pid']} on host {info.get('host', '?')}"
    if info.get("since"):
        text += f" (since {info['since']})"
    if info.get("host") == socket.gethostname() and not pid_alive(int(info["pid"])):
        text += "; that process has ended, so a process it started still holds the lock (`fuser` on the lock file " \
                "names it)"
    return text


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _refusal(directory: Path, key: str, fd: int) -> ConfigError:
    return ConfigError(f"key '{key}': {directory} is in use by another align run, {_holder(fd)}; two runs on one "
                       f"directory would overwrite each other's checkpoints and log every step twice. Wait for it to "
                       f"end, or choose another {key}")


def _held_here(directory: Path) -> bool:
    """Whether this process holds `directory`'s lock (on the lock file that is there now, not a deleted one)."""
    fd = _HELD.get(str(directory.resolve()))
    if fd is None:
        return False
    try:
        same = os.fstat(fd).st_ino == os.stat(directory / LOCK).st_ino
    except OSError:
        same = False
    if not same:  # the directory (or its lock file) was removed and made again: that lock guards nothing
        os.close(_HELD.pop(str(directory.resolve())))
    return same


def check_unlocked(directory: str | Path, key: str = "output_dir") -> None:
    """Refuse (ConfigError naming the holder) when another process holds `directory`'s lock. Writes nothing: a
    directory without a lock file is not locked."""
    directory = Path(directory)
    lock = directory / LOCK
    if not lock.is_file() or _held_here(directory):
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return  # unreadable: lock_dir reports it when it tries
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(directory, key, fd) from None
    finally:
        os.close(fd)  # closing drops the probe's shared lock


def lock_dir(directory: str | Path, key: str = "output_dir") -> Path:
    """Take `directory`'s lock for the rest of this process (creating the directory), or refuse naming the holder.
    Returns the lock file."""
    directory = Path(directory)
    lock = directory / LOCK
    if _held_here(directory):
        return lock
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the processes the run starts
    except OSError as e:
        raise ConfigError(f"key '{key}': cannot create the lock file {lock} ({e.strerror}); {key} must be a "
                          "writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        error = _refusal(directory, key, fd)
        os.close(fd)
        raise error from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    _HELD[str(directory.resolve())] = fd
    return lock


def unlock_dir(directory: str | Path) -> None:
    """Release `directory`'s lock if this process holds it (the lock file stays: removing it would let a third
    process lock a new file while a second still waits on the old one)."""
    fd = _HELD.pop(str(Path(directory).resolve()), None)
    if fd is not None:
        os.close(fd)
