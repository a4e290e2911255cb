"""Recipes rerun like make: a finished stage is reused only when it was made with the settings asked for now, from
the same outputs of the stages it reads.

When a stage of `align run` finishes, RUN_DIR/<stage>/align-stage.json records
  * its resolved settings: the stage's whole config, with the bundled data directory written {data} and the run
    directory {run_dir}, without the keys that do not change what it makes (IGNORED: resume, logging, checkpoint
    cadence, held-out evaluation cadence; rewards' timeout_s and isolate are left out when records are compared);
  * the stamps of the earlier stages whose outputs it reads ("@stage" references), and its own stamp (new at
    every finish).
On the next run, before any work or write (`plan_reruns`):
  * a finished stage whose settings differ, or that read an output its upstream stage has since replaced, is
    refused, naming each differing key with its old and new value;
  * `--from STAGE` reruns STAGE and every stage after it: their earlier directories are moved (never deleted) to
    RUN_DIR/.replaced/<UTC time>/ first, since they belong to settings no longer asked for;
  * a finished stage with no record (made by an align before records existed) is compared through the identity in
    its align-run.json (align.run.rundir) where it has one;
  * an unfinished stage resumes under its own stage's rule (align.run.rundir: the same identity, or refused).
So `recipe.json` and each stage's record only ever describe what ran.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path

from .config import ConfigError, config_to_dict
from .resources import data_dir
from .run.checkpoint import atomic_write_text
from .run.rundir import comparable

RECORD = "align-stage.json"
REPLACED = ".replaced"
# Settings that do not change what a stage makes.
IGNORED = ("output_dir", "resume", "log_every", "tensorboard", "save_every", "keep_last", "eval_every")


def stage_dir(stage) -> Path:
    return Path(stage.config.output_dir)


def _portable(value, subs: dict[str, str]):
    """`value` with the data and run directories written as placeholders (a moved checkout still matches)."""
    if isinstance(value, dict):
        return {k: _portable(v, subs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v, subs) for v in value]
    if isinstance(value, str):
        for path, name in subs.items():
            value = value.replace(path, name)
    return value


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def portable_settings(cfg, run_dir: Path, ignored: tuple[str, ...] = ()) -> dict:
    """A config as plain JSON values, the data and run directories as placeholders, `ignored` keys left out."""
    values = {k: v for k, v in config_to_dict(cfg).items() if k not in ignored}
    values = json.loads(json.dumps(values, default=str))
    return _portable(values, {str(data_dir()): "{data}", str(run_dir): "{run_dir}"})


def stage_settings(stage, run_dir: Path) -> dict:
    """The settings that decide what `stage` makes (see the module docstring)."""
    return portable_settings(stage.config, run_dir, IGNORED)


def _strings(value):
    """Every string in `value`, at any depth of dicts and lists."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, (str, Path)):
        yield str(value)


def upstream(stage, earlier: list) -> list:
    """The earlier stages whose outputs `stage`'s settings name (its "@stage" references, resolved)."""
    values = set(_strings(config_to_dict(stage.config)))
    return [s for s in earlier if str(s.output) in values]


def read_record(stage) -> dict | None:
    path = stage_dir(stage) / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"{path}: unreadable; not reusing a stage align cannot identify (rerun it with --from "
                          f"{stage.name})") from None


def write_record(stage, run_dir: Path, earlier: list) -> None:
    """After `stage` finished: its settings, the stamps of what it read, a new stamp of its own."""
    inputs = {s.name: (read_record(s) or {}).get("stamp") for s in upstream(stage, earlier)}
    record = {"stage": stage.name, "kind": stage.kind, "stamp": uuid.uuid4().hex,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": stage_settings(stage, run_dir), "inputs": inputs}
    atomic_write_text(stage_dir(stage) / RECORD, json.dumps(record, indent=1))


def finished(stage) -> bool:
    return (stage.output / "config.json").is_file()


@dataclasses.dataclass
class RerunPlan:
    run_dir: Path
    rerun: list[str]            # stages run again from scratch (their earlier directories moved aside first)

    def finished(self, stage) -> bool:
        """Whether `stage` is reused as it is."""
        return stage.name not in self.rerun and finished(stage)

    def move_aside(self, stages: list) -> None:
        """Move the earlier directories of the stages to rerun to RUN_DIR/.replaced/<UTC time>/."""
        moving = [stage_dir(s) for s in stages if s.name in self.rerun and stage_dir(s).exists()]
        if not moving:
            return
        dest = self.run_dir / REPLACED / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest.mkdir(parents=True, exist_ok=False)
        for path in moving:
            path.rename(dest / path.name)
            print(f"run: moved the earlier {path} to {dest / path.name} (--from; delete it when no longer needed)",
                  flush=True)


def _legacy_differences(stage) -> list[tuple[str, object, object]]:
    """A finished stage without a record: its align-run.json identity against the current settings."""
    from .run.rundir import IDENTITY_KEYS, MANIFEST, identity

    manifest = stage_dir(stage) / MANIFEST
    if stage.kind not in IDENTITY_KEYS or not manifest.is_file():
        return []
    then = comparable(json.loads(manifest.read_text()).get("identity", {}))
    now = comparable(identity(stage.kind, stage.config))
    return [(k, then.get(k), now.get(k)) for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]


def plan_reruns(run_dir: Path, stages: list, rerun_from: str | None = None) -> RerunPlan:
    """Which stages run again; ConfigError (before any work) for a finished stage that no longer matches."""
    names = [s.name for s in stages]
    if rerun_from is not None and rerun_from not in names:
        raise ConfigError(f"--from {rerun_from!r}: the recipe has no such stage (its stages: {', '.join(names)})")
    rerun = names[names.index(rerun_from):] if rerun_from else []
    problems: list[str] = []
    first_bad: str | None = None
    for i, stage in enumerate(stages):
        if stage.name in rerun or not finished(stage):
            continue
        record = read_record(stage)
        if record is None:
            diff = _legacy_differences(stage)
            reasons = [f"{k}: {a!r} then, {b!r} now" for k, a, b in diff[:6]]
        else:
            then = _flat(comparable(record.get("settings", {})))
            now = _flat(comparable(stage_settings(stage, run_dir)))
            diff = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
            reasons = [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in diff[:6]]
            for up in upstream(stage, stages[:i]):
                made_from = record.get("inputs", {}).get(up.name)
                if made_from != (read_record(up) or {}).get("stamp"):
                    reasons.append(f"it was made from an earlier output of stage '{up.name}'")
        if reasons:
            problems.append(f"stage '{stage.name}' finished with other settings ({'; '.join(reasons)})")
            first_bad = first_bad or stage.name
    if problems:
        raise ConfigError(f"{run_dir}: {'. '.join(problems)}. Rerun from there with `--from {first_bad}` (the "
                          f"earlier outputs are moved to {run_dir / REPLACED}/), or choose a new run_dir")
    return RerunPlan(run_dir, rerun)
