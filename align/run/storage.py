"""What a run does when the disk refuses a write: a full device (ENOSPC, a quota), a file system that became
read-only, or a run directory that is gone (deleted, moved, unmounted).

The run's state writes (checkpoints, the final model, metrics rows; `guarded_write`) turn such a failure into a
`StorageError` that names the path, the bytes the write needs and the bytes free, and what the same command does
next, instead of the writer's own error (`SafetensorError: ... No space left on device`, torch's `RuntimeError:
[enforce fail at inline_container.cc:672]`, which carry no errno: the free space tells). Checkpoints are written
into a temporary directory and renamed into place (align/run/checkpoint.py), so a failed one leaves the previous
checkpoint the newest; once space is freed the same command resumes from it, and metrics.jsonl keeps one row per
step (MetricsLogger.truncate_after). Any other error of a write is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import AlignError, StorageError

GONE_NEXT = "Restore it and rerun the same command, or start over in a new output_dir"
FULL = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def size_text(n: int | None) -> str:
    """'2.0 MB (1994752 bytes)'."""
    return "an unknown amount" if n is None else f"{n / 1e6:.1f} MB ({n} bytes)"


def tensor_bytes(tree) -> int:
    """Bytes of every tensor in a nested dict / list / tuple (an optimizer's state, a state dict)."""
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the file system of `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def diagnose(target: Path, root: Path, needed: int, error: BaseException) -> str | None:
    """Why writing about `needed` bytes at `target`, inside the run directory `root`, failed with `error`, when the
    disk is the cause; None when it is not."""
    code = error.errno if isinstance(error, OSError) else None
    if not root.is_dir():
        return (f"the run directory {root} is gone (deleted, moved or unmounted during the run); align does not make "
                "it again")
    free = free_bytes(root)
    if code in FULL or "No space left on device" in str(error) or (free is not None and free < needed):
        odd = (" (the device refused it with bytes free: out of inodes, or over a quota)"
               if free is not None and free >= needed else "")
        return (f"no space left on the device: writing {target} needs about {size_text(needed)}, {size_text(free)} "
                f"free{odd}")
    if code in READ_ONLY or not os.access(root, os.W_OK):
        return f"{root} cannot be written any more ({os.strerror(code) if code else 'read-only'}): writing {target}"
    if code in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
        return f"part of {target} is gone ({os.strerror(code)}; deleted or unmounted during the run)"
    return None


@contextlib.contextmanager
def guarded_write(target: str | Path, root: str | Path, needed: int, what: str,
                  then: Callable[[], str]) -> Iterator[None]:
    """Within the block, a write failure the disk caused (`diagnose`) is raised as StorageError: `what` (e.g.
    "checkpoint of step 2") not saved, why, and `then()`, what is left and what the same command does next."""
    try:
        yield
    except AlignError:
        raise
    except Exception as e:
        why = diagnose(Path(target), Path(root), needed, e)
        if why is None:
            raise
        after = then() if Path(root).is_dir() else GONE_NEXT
        raise StorageError(f"{what} not saved: {why}. {after}") from None
