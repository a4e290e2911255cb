"""Stage configs: dataclasses with a help text on every field, loaded from YAML plus `key=value` overrides.

    cfg = load_config(SFTConfig, "recipes/sft.yaml", ["lr=1e-5", "lora.enabled=true"])

Unknown keys, wrong types and bad values are refused before any work starts, with the file, line and key named
(`ConfigError`). Nested dataclass fields are addressed with dots (`lora.r=8`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError  # noqa: F401 (align.config.ConfigError, where every config check raises it)


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING):
    """A config field with its help text (shown by `align ... --help-config`)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def where(source: str, lines: dict[str, int], key: str) -> str:
    """'file:line' of a key, or just the source when the key has no line (it came from a key=value override)."""
    line = lines.get(key)
    return f"{source}:{line}" if line else source


def _key_lines(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None,
               seen: set[int] | None = None) -> dict[str, int]:
    """Map dotted keys to their 1-based line in the YAML file (each node visited once: an alias is not expanded)."""
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if isinstance(node, yaml.MappingNode) and id(node) not in seen:
        seen.add(id(node))
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            _key_lines(v, key + ".", out, seen)
    return out


MAX_ALIASES = 32  # recipes need few; a "billion laughs" document needs many


def _check_yaml(path: Path, text: str, node: yaml.Node | None) -> None:
    """Refuse alias bombs (by counting alias events, before anything is expanded) and duplicate keys."""
    aliases = sum(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text))
    if aliases > MAX_ALIASES:
        raise ConfigError(f"{path}: uses {aliases} YAML aliases (at most {MAX_ALIASES}); write the values out")
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            keys: dict = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in keys:
                        raise ConfigError(f"{path}:{k.start_mark.line + 1}: duplicate key '{k.value}' (first at "
                                          f"line {keys[k.value]})")
                    keys[k.value] = k.start_mark.line + 1
                todo.append(v)
        elif isinstance(n, yaml.SequenceNode):
            todo.extend(n.value)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, at: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, at)
            except ConfigError:
                continue
        raise ConfigError(f"{at}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{at}: key '{key}' must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single item where a list is expected: accept it as a one-item list
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", at) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: key '{key}' expects a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", at) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: key '{key}' expects a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{at}: key '{key}' expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{at}: key '{key}' expects an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "5e-6" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{at}: key '{key}' expects a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{at}: key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{at}: key '{key}' expects a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and "path" in {f.name for f in dataclasses.fields(tp)}:  # `model=DIR`: rm's old key
            raise ConfigError(f"{at}: key '{key}' is a mapping ({', '.join(f.name for f in dataclasses.fields(tp))}); "
                              f"write {key}.path={value} (in YAML `{key}: {{path: {value}}}`)")
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: key '{key}' expects a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".", at, {})
    raise ConfigError(f"{at}: key '{key}' has an unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str, source: str, lines: dict[str, int]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        at = where(source, lines, key)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{at}: unknown key '{key}'{hint}; {cls.__name__} has: {', '.join(fields)}")
        kwargs[name] = _coerce(value, hints[name], key, at)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: required key '{prefix}{missing[0]}' is missing ({_help(fields[missing[0]])})")
    return cls(**kwargs)


def _help(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a mapping")
        tree = node
    tree[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["lr=1e-5", "lora.r=8"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. "@stage"): the plain string
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_dicts(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Parse a YAML mapping; returns (values, line of each dotted key). Errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    try:
        node = yaml.compose(text)
        _check_yaml(path, text, node)
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(values).__name__}")
    return values, _key_lines(node)


def build_config(cls: type, values: dict, source: str = "<config>", lines: dict[str, int] | None = None,
                 prefix: str = ""):
    """Build and validate `cls` from a nested dict; `prefix` is prepended to key names in messages."""
    cfg = _build(cls, values, prefix, source, lines or {})
    check = getattr(cfg, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            where = f"{source} ({prefix.rstrip('.')})" if prefix else source
            raise ConfigError(f"{where}: {e}") from None
    return cfg


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load `cls` from an optional YAML file plus `key=value` overrides (overrides win)."""
    values, lines = read_yaml(path) if path else ({}, {})
    extra = parse_overrides(overrides or [])
    source = str(path) if path else "<command line>"
    if extra:
        source = f"{source} + overrides" if path else source
    return build_config(cls, merge_dicts(values, extra), source, lines)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key with its default and help text (for `--help-config`)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += describe(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        out.append(f"  {prefix}{f.name} = {default!r}\n      {_help(f)}")
    return out


_VARIABLE = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def directory_path(value: str, key: str) -> str:
    """A run directory as a config gives it, with `~` and `$VAR` / `${VAR}` expanded as a shell would have done had
    the value not been quoted (else `~/runs/x` would become a directory named `~` under the working directory).
    Refused naming `key`: an empty path (which would write into the working directory), an unset variable, an
    unknown `~user`."""
    if not value.strip():
        raise ConfigError(f"key '{key}' must be a directory path, got {value!r}")
    unset = [a or b for a, b in _VARIABLE.findall(value) if (a or b) not in os.environ]
    if unset:
        raise ConfigError(f"key '{key}': {value!r} uses the environment variable ${unset[0]}, which is not set; set "
                          "it or write the path out")
    expanded = os.path.expandvars(os.path.expanduser(value))
    if expanded.startswith("~"):
        raise ConfigError(f"key '{key}': {value!r} names the home of an unknown user ({expanded.split('/')[0]})")
    if not expanded.strip():
        raise ConfigError(f"key '{key}': {value!r} expands to an empty path")
    return expanded


def check_writable_dir(path: str | Path, key: str) -> None:
    """Refuse, naming `key`, a directory path that cannot be made or written: an existing file there or above it,
    or a read-only place (a read-only file system or no write permission). Writes nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"key '{key}': {path} exists and is a file, not a directory; choose a directory path")
    nearest = path
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(f"key '{key}': {path} cannot be a directory: {nearest} is a file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"key '{key}': {path} cannot be written: {nearest} is read-only (a read-only file system "
                          "or no write permission); choose a writable place")


MAX_SEED = 2**32 - 1  # numpy's (and accelerate's set_seed) largest seed


def check_seed(seed: int, key: str = "seed") -> None:
    """Refuse a seed numpy cannot take (a ValueError from deep inside the run otherwise)."""
    require(0 <= seed <= MAX_SEED, key, f"an integer in [0, 2**32 - 1] = [0, {MAX_SEED}] (numpy's seed range)", seed)


def require(cond: bool, key: str, expected: str, value: Any) -> None:
    """Raise `ConfigError` naming `key` unless `cond` holds (used in `validate()` methods)."""
    if not cond:
        raise ConfigError(f"key '{key}' must be {expected}, got {value!r}")


MAX_STEPS = 10_000_000  # optimizer steps: 116 days at 1 step a second, beyond any run this toolkit is for


def require_steps(steps: float, key: str, how: str = "") -> None:
    """Refuse, naming `key`, a step count no run reaches: not finite or over MAX_STEPS (the implied duration is
    said at an optimistic 1 step a second). `how`: how `steps` follows from `key` (e.g. "epochs x 1500 rows / 16")."""
    try:
        steps = float(steps)
    except OverflowError:  # an int beyond any float
        steps = math.inf
    if math.isfinite(steps) and steps <= MAX_STEPS:
        return
    implied = f"{steps:.3g} steps" if math.isfinite(steps) else "more than 1.8e+308 steps"
    days = f" (~{steps / 86400:.3g} days at 1 step a second)" if math.isfinite(steps) else ""
    raise ConfigError(f"key '{key}' implies {implied}{' = ' + how if how else ''}{days}; at most {MAX_STEPS:,} "
                      f"steps are run")
