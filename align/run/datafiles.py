"""Reading a local data file into rows (JSONL, JSON, Parquet, a `save_to_disk` directory), and `DataError`, which
every data error raises. Where a source is and how its fields become align's: `align.run.formats`; what a row must
hold: `align.run.data`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError  # noqa: F401 (re-exported: align.run.data.DataError)


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file, read directly (no Arrow conversion: a GRPO prompt file does not pull in
    `datasets` and its ~90 MB of imports). Every row gets every key any row has, None where absent, as `datasets`
    gives them. A bad line is reported with its number."""
    rows: list[dict] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(value).__name__}")
            rows.append(value)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def read_local(path: Path):
    """A local dataset file or `save_to_disk` directory: JSONL as a list of dicts, the rest as a Dataset."""
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.suffix.lower() == ".jsonl" and not path.is_dir():
        return _read_jsonl(path)
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
    """`rows` (a list of dicts or a Dataset) if it has rows and no repeated 'id'."""
    if len(rows) == 0:
        raise DataError(f"{path}: no rows")
    ids = [r.get("id") for r in rows] if isinstance(rows, list) else \
        (rows["id"] if "id" in rows.column_names else [])
    seen: dict = {}
    for i, row_id in enumerate(ids):
        if row_id is not None and row_id in seen:
            raise DataError(f"{path}:row {i + 1}: field 'id' {row_id!r} repeats row {seen[row_id] + 1}")
        seen[row_id] = i
    return rows
