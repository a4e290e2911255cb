"""Reading a local data file into rows (JSONL, JSON, Parquet, a `save_to_disk` directory), and `DataError`, which
every data error raises. Where a source is and how its fields become align's: `align.run.formats`; what a row must
hold: `align.run.data`."""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError  # noqa: F401 (re-exported: align.run.data.DataError)


class JsonlRows(Sequence):
    """The rows of a JSONL file, read from disk as they are asked for (a 200 MB file is not held in memory).

    Opening it reads the file once, line by line: a line that is not UTF-8, not JSON or not an object is reported
    with its number, and what is kept is where each row starts and ends (16 bytes a row), the keys, and the first
    repeated 'id' (`repeated_id`). `rows[i]` then reads row i again with one `os.pread`; iterating streams the file.
    Every row gets every key any row has, None where absent, as `datasets` gives them. No Arrow conversion: a GRPO
    prompt file does not pull in `datasets` and its ~90 MB of imports. A file changed after it was opened is refused
    when next read (its rows would no longer be those that were checked)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        starts, ends, keys = array("q"), array("q"), {}
        id_rows, id_hashes = array("q"), array("q")
        with self.path.open("rb") as f:
            pos = 0
            for lineno, raw in enumerate(f, 1):
                start, pos = pos, pos + len(raw)
                value = _parse_line(raw, self.path, lineno)
                if value is None:
                    continue
                keys.update(dict.fromkeys(value))
                row_id = value.get("id")
                if row_id is not None:
                    id_rows.append(len(starts))
                    id_hashes.append(hash(_hashable(row_id)))
                starts.append(start)
                ends.append(pos)
            self._stamp = _stamp(os.fstat(f.fileno()))
        self.keys = list(keys)
        self._starts, self._ends = np.frombuffer(starts, np.int64), np.frombuffer(ends, np.int64)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.repeated_id = self._first_repeat(np.frombuffer(id_rows, np.int64), np.frombuffer(id_hashes, np.int64))

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __len__(self) -> int:
        return len(self._starts)

    def _complete(self, value: dict) -> dict:
        return {k: value.get(k) for k in self.keys}

    def __getitem__(self, i: int) -> dict:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"JsonlRows indices are integers, not {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        start, end = int(self._starts[i]), int(self._ends[i])
        if _stamp(os.fstat(self._fd)) != self._stamp:
            raise DataError(f"{self.path}: changed since the run read it (rows are read from the file as training "
                            f"reaches them); restore it, or start a run on the new file")
        value = _parse_line(os.pread(self._fd, end - start, start), self.path, f"row {i % len(self) + 1}")
        if value is None:
            raise DataError(f"{self.path}:row {i % len(self) + 1}: changed since the run read it")
        return self._complete(value)

    def __iter__(self) -> Iterator[dict]:
        with self.path.open("rb") as f:
            if _stamp(os.fstat(f.fileno())) != self._stamp:
                raise DataError(f"{self.path}: changed since it was read; restore it, or start again on the new file")
            for lineno, raw in enumerate(f, 1):
                value = _parse_line(raw, self.path, lineno)
                if value is not None:
                    yield self._complete(value)

    def _first_repeat(self, rows: np.ndarray, hashes: np.ndarray) -> tuple[int, int, object] | None:
        """(row, earlier row, id) of the first row whose 'id' repeats an earlier row's, 0-based; None if none.
        Rows are compared by the hash of their id first; only rows sharing a hash are read again."""
        order = np.argsort(hashes, kind="stable")
        same = hashes[order][1:] == hashes[order][:-1]
        candidates = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
        first_seen: dict = {}
        for row in sorted(int(rows[c]) for c in candidates):
            row_id = _hashable(self[row]["id"])
            if row_id in first_seen:
                return row, first_seen[row_id], self[row]["id"]
            first_seen[row_id] = row
        return None


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


def _hashable(value):
    """A JSON value as something hashable that is equal exactly when the values are (lists and objects by text)."""
    return value if not isinstance(value, (list, dict)) else ("json", json.dumps(value, sort_keys=True))


def _parse_line(raw: bytes, path: Path, where) -> dict | None:
    """One JSONL line as a dict (None for a blank line); `where`: its line number, or a label."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}:{where}: expected a JSON object per line, got {type(value).__name__}")
    return value


def read_local(path: Path):
    """A local dataset file or `save_to_disk` directory: JSONL as `JsonlRows`, the rest as a (memory-mapped
    Arrow) Dataset."""
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.suffix.lower() == ".jsonl" and not path.is_dir():
        return JsonlRows(path)
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; point at one split's directory")
        else:
            suffix = path.suffix.lower()
            if suffix == ".json":
                if not path.read_bytes().strip():
                    raise DataError(f"{path}: no rows")
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
            elif suffix == ".parquet":
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            else:
                raise DataError(f"{path}: unsupported data format {suffix!r} (use .jsonl, .json, .parquet or a "
                                f"save_to_disk directory)")
    except DataError:
        raise
    except Exception as e:  # datasets / pyarrow raise many types; name the file either way
        raise DataError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
    return ds


def checked_rows(path: str | Path, rows):
    """`rows` (a list of dicts, a JsonlRows or a Dataset) if it has rows and no repeated 'id'."""
    if len(rows) == 0:
        raise DataError(f"{path}: no rows")
    if isinstance(rows, JsonlRows):
        if rows.repeated_id is not None:
            i, j, row_id = rows.repeated_id
            raise DataError(f"{path}:row {i + 1}: field 'id' {row_id!r} repeats row {j + 1}")
        return rows
    ids = [r.get("id") for r in rows] if isinstance(rows, list) else \
        (rows["id"] if "id" in rows.column_names else [])
    seen: dict = {}
    for i, row_id in enumerate(ids):
        if row_id is not None and row_id in seen:
            raise DataError(f"{path}:row {i + 1}: field 'id' {row_id!r} repeats row {seen[row_id] + 1}")
        seen[row_id] = i
    return rows
