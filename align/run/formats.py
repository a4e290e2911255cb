"""Where rows come from (data sources) and how a public dataset's fields become align's (columns, formats).

A data source is written wherever a data file is accepted (train_data, eval_data, eval.reasoning, eval.code, ...):

    data/x.jsonl                        a local file or save_to_disk directory: a path that exists always wins
    openai/gsm8k:main:train             a hub dataset, owner/name[@revision][:config[:split]], through
                                        `datasets.load_dataset` (split: train unless named; `id::test` keeps the
                                        default config); under HF_HUB_OFFLINE=1 only from the datasets cache
    SOURCE#format=gsm8k                 options after '#', separated by '#': format=gsm8k|math|humaneval|mbpp,
    SOURCE#columns=question:prompt+solution:answer      columns=FIELD:ALIGN_FIELD+...
    data/gsm8k.yaml                     a sidecar: a YAML mapping with the keys of `MAPPING_KEYS`, e.g.
                                        {hub: openai/gsm8k, config: main, split: test, format: gsm8k}
                                        (a relative `path:` is read next to the sidecar)

and in code also as that mapping (a dict). A string is a hub id only when it is not an existing path, does not look
like one (starts with / . ~, has more than one '/', its first component exists here, or it ends in a data-file
suffix) and is a valid repository id.

`columns` renames the dataset's fields to align's (prompt, completion, messages, answer, tests, ...) and runs
first; a named format then builds align's fields from the dataset's own, keeping the other fields as reward
columns:
  gsm8k      question -> prompt; answer (the worked solution) -> completion; its final '#### 72' -> answer "72"
             (thousands separators removed)
  math       problem -> prompt; solution -> completion; answer: the row's `answer` when it has one (MATH-500),
             else the last \\boxed{...} of the solution, braces balanced
  humaneval  prompt (signature + docstring) -> prompt asking for the whole function in a ```python block;
             test + entry_point -> tests ["<test>\\n\\ncheck(<entry_point>)\\n"] (the code reward's format: a list
             of test snippets); the prompt's imports and helper functions -> prelude (run before the program and
             in the tests' namespace); prompt + canonical_solution -> completion
  mbpp       text (or `prompt`, sanitized config) + test_list -> prompt; test_list -> tests, each after the row's
             test_setup_code / test_imports; code -> completion
Every error names the source, the row (1-based) and the field.

Message content may also be a list of parts, `[{"type": "text", "text": ...}, ...]` (the OpenAI / multimodal
chat form; `align.run.data.content_text`): the text parts are joined with no separator, as chat templates that accept
parts render them. A part of any other type (image, audio, ...) is refused, naming the row and the part's type:
align trains on text only.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from rewards.answers import gsm8k_answer, last_boxed  # noqa: F401 (re-exported: align.run.formats.last_boxed)

from .datafiles import DataError, checked_rows, read_local

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".yaml", ".yml", ".txt")
SIDECAR_SUFFIXES = (".yaml", ".yml")
MAPPING_KEYS = ("hub", "path", "config", "split", "revision", "format", "columns")


@dataclass
class DataSource:
    """One data source, parsed (see the module docstring)."""

    name: str                               # as written: messages name it (`name:row N: field ...`)
    path: Path | None = None                # a local file or save_to_disk directory
    hub: str | None = None                  # a hub dataset id, owner/name
    revision: str | None = None             # the hub revision (branch, tag, commit); None: the default branch
    config: str | None = None               # the hub dataset's config (subset); None: its default
    split: str = "train"                    # the hub split (datasets slicing like `test[:100]` works)
    format: str | None = None               # a key of FORMATS
    columns: dict[str, str] = field(default_factory=dict)  # dataset field -> align field, applied before format


# ----------------------------------------------------------------------------------------------- parsing


def _looks_local(text: str) -> bool:
    """True when `text` is to be read as a local path, existing or not (see the module docstring)."""
    from ..model.hub import hub_ref

    if text.lower().endswith(DATA_SUFFIXES):
        return True
    try:
        return hub_ref(text) is None
    except ValueError:  # hub_ref refuses a malformed '@revision' by raising ConfigError
        return True


def _parse_columns(value, name: str) -> dict[str, str]:
    """`columns` as a mapping of non-empty names; the string option form is `FIELD:ALIGN+FIELD:ALIGN`."""
    if isinstance(value, str):
        pairs = [p.split(":", 1) for p in value.split("+") if p]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise DataError(f"{name}: option 'columns' must be FIELD:ALIGN_FIELD joined by '+' "
                            f"(columns=question:prompt+solution:answer), got {value!r}")
        value = dict(pairs)
    if not isinstance(value, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                              for k, v in value.items()):
        raise DataError(f"{name}: key 'columns' must map dataset field names to align's (prompt, completion, "
                        f"messages, answer, tests), got {value!r}")
    return dict(value)


def _parse_format(value, name: str) -> str | None:
    if value is None or value == "":
        return None
    if value not in FORMATS:
        raise DataError(f"{name}: unknown format {value!r}; known formats: {', '.join(FORMATS)}")
    return value


def _options(text: str, name: str) -> dict:
    """The '#key=value' options of a source string."""
    out: dict = {}
    for item in text.split("#"):
        key, eq, value = item.partition("=")
        if not eq or key not in ("format", "columns"):
            raise DataError(f"{name}: option {item!r} is not format=NAME or columns=FIELD:ALIGN_FIELD+...")
        out[key] = value
    return out


def _hub_parts(base: str, name: str) -> dict:
    """hub / revision / config / split of `owner/name[@revision][:config[:split]]`."""
    repo, config, split = (base.split(":", 2) + ["", ""])[:3]
    repo, _, revision = repo.partition("@")
    return {"hub": repo, "revision": revision or None, "config": config or None, "split": split or "train"}


def _from_mapping(values: dict, name: str, base: Path | None) -> DataSource:
    unknown = sorted(set(values) - set(MAPPING_KEYS))
    if unknown:
        raise DataError(f"{name}: unknown key '{unknown[0]}'; a data source mapping has {', '.join(MAPPING_KEYS)}")
    if ("hub" in values) == ("path" in values):
        raise DataError(f"{name}: a data source mapping needs exactly one of 'hub' (a dataset id) or 'path'")
    for key in ("hub", "path", "config", "split", "revision"):
        if values.get(key) is not None and not (isinstance(values[key], str) and values[key]):
            raise DataError(f"{name}: key '{key}' must be a non-empty string, got {values[key]!r}")
    path = None
    if values.get("path"):
        path = Path(values["path"]).expanduser()
        path = base / path if base is not None and not path.is_absolute() else path
    return DataSource(name=name, path=path, hub=values.get("hub"), revision=values.get("revision"),
                      config=values.get("config"), split=values.get("split") or "train",
                      format=_parse_format(values.get("format"), name),
                      columns=_parse_columns(values.get("columns") or {}, name))


def _read_sidecar(path: Path, name: str) -> DataSource:
    from ..config import ConfigError, read_yaml

    try:
        values, _ = read_yaml(path)
    except ConfigError as e:
        raise DataError(str(e)) from None
    if not values:
        raise DataError(f"{path}: a data source sidecar must be a mapping with 'hub' or 'path' "
                        f"({', '.join(MAPPING_KEYS)})")
    return replace(_from_mapping(values, str(path), path.parent), name=name)


def parse_source(source) -> DataSource:
    """The DataSource a configured value names: a Path (always local), a string (see the module docstring), or a
    mapping with the keys of MAPPING_KEYS. Nothing is read but a sidecar; no network."""
    if isinstance(source, dict):
        return _from_mapping(source, source_name(source), None)
    if isinstance(source, Path):
        return _sidecar_or_path(source, str(source))
    if not isinstance(source, str) or not source:
        raise DataError(f"{source!r}: a data source is a path, a hub dataset id or a mapping")
    if Path(source).expanduser().exists():
        return _sidecar_or_path(Path(source).expanduser(), source)
    base, sep, opts = source.partition("#")
    options = _options(opts, source) if sep else {}
    extra = {"format": _parse_format(options.get("format"), source),
             "columns": _parse_columns(options["columns"], source) if "columns" in options else None}
    if Path(base).expanduser().exists() or _looks_local(base.split(":", 1)[0]):
        src = _sidecar_or_path(Path(base).expanduser(), source)
    else:
        src = DataSource(name=source, **_hub_parts(base, source))
    return replace(src, format=extra["format"] or src.format,
                   columns=extra["columns"] if extra["columns"] is not None else src.columns)


def _sidecar_or_path(path: Path, name: str) -> DataSource:
    if path.suffix.lower() in SIDECAR_SUFFIXES and path.is_file():
        return _read_sidecar(path, name)
    return DataSource(name=name, path=path)


def source_name(source) -> str:
    """How messages name a configured source: the string as written, a mapping as `hub:config:split`."""
    if isinstance(source, dict):
        where = source.get("hub") or source.get("path") or "?"
        parts = [str(where)] + [str(source[k]) for k in ("config", "split") if source.get(k)]
        return ":".join(parts)
    return str(source)


def check_source(source) -> str | None:
    """Why `source` cannot be used, found without loading it (a local path that does not exist, a malformed
    string, mapping or sidecar, an unknown format); None when it may be (a hub id is only checked when loaded)."""
    try:
        src = parse_source(source)
    except DataError as e:
        return str(e)
    if src.path is not None and not src.path.exists():
        return f"data file {src.path} does not exist"
    return None


# ------------------------------------------------------------------------------------------------- loading


def load_rows(source):
    """The rows of a data source (a local file or `save_to_disk` directory, a hub dataset id, a sidecar or mapping;
    `columns` / `format` applied): JSONL as a `JsonlRows` (read from the file as asked for), a Dataset, or a list
    of dicts where `columns` / `format` reshape them."""
    src = parse_source(source)
    rows = read_local(src.path) if src.path is not None else load_hub(src)
    return reshape(checked_rows(src.name, rows), src)


def load_hub(src: DataSource):
    """The split `src` names of a hub dataset, as a `datasets.Dataset` (from the datasets cache when offline)."""
    import datasets

    datasets.disable_progress_bars()
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    what = (f"{src.name}: not a local path, and hub dataset {src.hub} (config {src.config or 'default'}, split "
            f"{src.split}{', revision ' + src.revision if src.revision else ''})")
    try:
        return datasets.load_dataset(src.hub, src.config, split=src.split, revision=src.revision)
    except ConnectionError:
        if offline:
            raise DataError(f"{what} is not in the datasets cache {datasets.config.HF_DATASETS_CACHE}, and "
                            f"HF_HUB_OFFLINE=1 forbids downloading it: load it once where the hub is reachable "
                            f"(into that cache), unset HF_HUB_OFFLINE, or give a local file") from None
        raise DataError(f"{what}: the hub could not be reached and it is not in the datasets cache "
                        f"{datasets.config.HF_DATASETS_CACHE}") from None
    except Exception as e:  # datasets raises many types (not found, gated, unknown config / split); name the id
        first = str(e).strip().splitlines()
        mode = "offline, datasets cache only" if offline else "online"
        raise DataError(f"{what} cannot be loaded ({mode}: {type(e).__name__}: "
                        f"{' '.join(first[:2]) if first else ''})") from None


def reshape(rows, src: DataSource):
    """`rows` with `src.columns` renamed, then `src.format` applied; unchanged (same object) when neither is set."""
    if not src.columns and not src.format:
        return rows
    rows = [dict(r) for r in rows]
    if src.columns:
        present = set(rows[0]) if rows else set()
        for name in src.columns:
            if name not in present:
                raise DataError(f"{src.name}: key 'columns' maps field {name!r}, which the data do not have "
                                f"(fields: {', '.join(sorted(present))})")
        rows = [rename(r, src.columns) for r in rows]
    if src.format:
        convert = FORMATS[src.format]
        rows = [{**r, **convert(r, f"{src.name}:row {i + 1}")} for i, r in enumerate(rows)]
    return rows


def rename(row: dict, columns: dict[str, str]) -> dict:
    """`row` with each field `a` of `columns` moved to `columns[a]` (replacing a field of that name)."""
    out = {k: v for k, v in row.items() if k not in columns}
    out.update({new: row[old] for old, new in columns.items()})
    return out


# -------------------------------------------------------------------------------------------------- formats

HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, its signature "
                         "included, in one ```python code block.")
MBPP_INSTRUCTION = "Reply with the code in one ```python code block."


def _text(row: dict, key: str, where: str, fmt: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"not a non-empty string ({type(value).__name__})"
        raise DataError(f"{where}: field '{key}' is {got} (format {fmt} reads {', '.join(FORMAT_FIELDS[fmt])})")
    return value


def _fenced(code: str) -> str:
    return "```python\n" + code.rstrip("\n") + "\n```"


def gsm8k_row(row: dict, where: str) -> dict:
    solution = _text(row, "answer", where, "gsm8k")
    answer = gsm8k_answer(solution)
    if answer is None:
        raise DataError(f"{where}: field 'answer' has no final '#### <answer>' line (GSM8K's format), got "
                        f"{solution[-60:]!r}")
    return {"prompt": _text(row, "question", where, "gsm8k"), "completion": solution, "answer": answer}


def math_row(row: dict, where: str) -> dict:
    solution = _text(row, "solution", where, "math")
    given = row.get("answer")
    answer = given.strip() if isinstance(given, str) and given.strip() else last_boxed(solution)
    if answer is None:
        raise DataError(f"{where}: field 'solution' has no complete \\boxed{{...}} answer (and the row has no "
                        f"'answer'), got {solution[-60:]!r}")
    return {"prompt": _text(row, "problem", where, "math"), "completion": solution, "answer": answer}


def humaneval_row(row: dict, where: str) -> dict:
    prompt = _text(row, "prompt", where, "humaneval")
    test = _text(row, "test", where, "humaneval")
    entry = _text(row, "entry_point", where, "humaneval").strip()
    if not entry.isidentifier():
        raise DataError(f"{where}: field 'entry_point' must be a function name, got {entry!r}")
    if not re.search(r"^def check\(", test, re.MULTILINE):
        raise DataError(f"{where}: field 'test' defines no check(candidate) function (HumanEval's format)")
    out = {"prompt": f"{HUMANEVAL_INSTRUCTION}\n\n{_fenced(prompt)}", "tests": [f"{test}\n\ncheck({entry})\n"],
           "prelude": humaneval_prelude(prompt, entry)}
    if isinstance(row.get("canonical_solution"), str):
        out["completion"] = _fenced(prompt + row["canonical_solution"])
    return out


def humaneval_prelude(prompt: str, entry: str) -> str:
    """The prompt's code besides the function to write: its imports and helper functions (HumanEval/38's
    `encode_cyclic`), which HumanEval's grader runs with the completion and the test (the code reward's `prelude`)."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return ""
    lines = prompt.splitlines(keepends=True)
    parts = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        parts.append("".join(lines[first - 1:node.end_lineno]).rstrip("\n") + "\n")
    return "".join(parts)


def mbpp_row(row: dict, where: str) -> dict:
    key = "text" if row.get("text") is not None else "prompt"
    task = _text(row, key, where, "mbpp")
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise DataError(f"{where}: field 'test_list' must be a non-empty list of assertion strings, got "
                        f"{tests!r:.80}")
    setup = "\n".join([row.get("test_setup_code") or "", *(row.get("test_imports") or [])]).strip()
    out = {"prompt": f"{task.strip()}\nYour code should pass these tests:\n" + "\n".join(tests) +
                     f"\n{MBPP_INSTRUCTION}",
           "tests": [f"{setup}\n{t}" if setup else t for t in tests]}
    if isinstance(row.get("code"), str):
        out["completion"] = _fenced(row["code"])
    return out


FORMATS: dict[str, Callable[[dict, str], dict]] = {
    "gsm8k": gsm8k_row, "math": math_row, "humaneval": humaneval_row, "mbpp": mbpp_row}
FORMAT_FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution", "answer (optional)"),
                 "humaneval": ("prompt", "test", "entry_point", "canonical_solution (optional)"),
                 "mbpp": ("text or prompt", "test_list", "test_setup_code / test_imports / code (optional)")}


# The fields that mark a row as a known dataset's (each set must all be present): `format_hint` names the format.
FORMAT_SHAPES: dict[str, tuple[frozenset, ...]] = {
    "gsm8k": (frozenset({"question", "answer"}),), "math": (frozenset({"problem", "solution"}),),
    "humaneval": (frozenset({"prompt", "test", "entry_point"}),),
    "mbpp": (frozenset({"text", "test_list"}), frozenset({"prompt", "test_list"}))}


def format_hint(row: dict) -> str:
    """What to add to an error about a row align cannot read as is: '; ...' naming the `#format=` that reads a row
    shaped like a known dataset's (FORMAT_SHAPES), or saying a preference pair is `align rm`'s; '' otherwise."""
    fields = {k for k, v in row.items() if v is not None} if isinstance(row, dict) else set()
    for name, shapes in FORMAT_SHAPES.items():
        shape = next((s for s in shapes if s <= fields), None)
        if shape is not None:
            return (f"; its fields {', '.join(sorted(shape))} are those of {name} rows: read the source with "
                    f"'#format={name}' (FILE#format={name}, or format: {name} in a sidecar / mapping)")
    if {"chosen", "rejected"} <= fields:
        return "; its fields chosen, rejected are a preference pair's: pairs train a reward model (align rm)"
    return ""
