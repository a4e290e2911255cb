"""glibc malloc tuning for training processes (align/run/allocator.py)."""

import sys

import pytest

from align.run.allocator import keep_freed_memory, release_freed_memory


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_applied_on_glibc_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("ALIGN_MALLOC_TUNING", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert keep_freed_memory() is True                         # mallopt accepted both values
    monkeypatch.setenv("ALIGN_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("ALIGN_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")     # the user's own setting wins
    assert keep_freed_memory() is False


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_freed_memory_goes_back_between_stages(monkeypatch):
    import torch

    for var in ("ALIGN_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    assert keep_freed_memory()                                   # freed heap is kept ...
    blocks = [torch.ones(1 << 18) for _ in range(64)]            # 64 x 1 MiB below the mmap threshold: heap
    del blocks
    assert release_freed_memory() is True                        # glibc returned memory to the OS
