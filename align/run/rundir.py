"""Who wrote a run directory: a run never deletes or overwrites what it did not write, nor resumes another's state.

At its start, before any write, every stage (sft, grpo, rm) claims its `output_dir` (`claim`):
  * missing or empty: created, and `align-run.json` records the stage kind and its identity — the settings that
    give the saved state its meaning (model path and the sha256 of its config.json, LoRA settings, training data,
    learning rate, seed, and the stage's own: GRPO's group size, β and rewards, ...); a hub model is recorded as
    its repo id and `model.revision`, the commit sha it resolved to (align/model/hub.py), so a rerun resumes only on the
    same commit (`owner/name@<that sha>` pins it after the branch moved);
  * holding a manifest with the same kind and identity: the run resumes (the same command, rerun);
  * holding a manifest that differs: refused, naming each differing key and both values, before anything is read
    or written; `resume=force` takes the directory over (the newer settings are recorded), a new `output_dir` is
    the other way out. Force never resumes another model's state: when the model (path, config.json hash, hub
    revision) or the stage kind differs and the directory holds a checkpoint, force is refused too, naming both
    models (resuming would train that checkpoint, and its optimizer and lr schedule, under the new model's name);
    without a checkpoint (a run that failed before its first save) there is no state to mix, and force takes over;
  * holding files but no manifest: refused, naming some of them: align writes only into directories it claimed,
    so a user's `final/thesis.tex` or another tool's `metrics.jsonl` is never replaced or truncated;
  * holding only the manifest of an attempt that failed before it wrote anything else: taken over with the new
    settings (the corrected command runs; there is nothing of that attempt to lose);
  * an `align run` recipe's run directory (its manifest's kind is "recipe"): refused, force or not.
Before any of this, the directory is locked for this process (align/run/lock.py: one run per directory, a second
is refused naming the first's pid and host). The lock file and align's own temporary names (`.NAME.tmp-PID`,
`.NAME.old-PID`) are never taken for another's files: a kill inside the manifest's write leaves
`.align-run.json.tmp-PID`, and the same command must still run. Such leftovers of a process that has ended are
removed once the directory is claimed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from ..config import ConfigError, config_to_dict, option
from ..model.hub import resolve_model
from .lock import LOCK, check_unlocked, lock_dir

MANIFEST = "align-run.json"
RECIPE_KIND = "recipe"  # the manifest's kind in an `align run` run directory (align/recipe.py: claim_run_dir)
_OWN_TEMP = re.compile(r"^\..+\.(tmp|old)-(\d+)$")  # atomic_write_text / atomic_dir's names: .NAME.tmp-PID
ResumeMode = Literal["auto", "force"]


def resume_option():
    """The `resume` config field of every stage."""
    return option("auto", "auto: resume output_dir only when it holds this same run (align-run.json); force: take "
                          "over a directory another align run wrote, with these settings (never one holding "
                          "checkpoints of another model).")

# Dotted config keys that give a stage's saved state its meaning (changing `steps`, logging or checkpoint cadence
# does not: a rerun with more steps continues the run).
IDENTITY_KEYS = {
    "sft": ("model.path", "model.lora", "train_data", "lr", "seed", "max_length", "packing"),
    "grpo": ("model.path", "model.lora", "train_data", "lr", "seed", "group_size", "beta", "rewards",
             "reward_mode", "aggregation", "inner_epochs", "minibatches", "prompts_per_step"),
    "rm": ("model.path", "train_data", "lr", "seed", "epochs"),
}


RUN_ONLY_REWARD_KEYS = ("timeout_s", "isolate")  # how a reward runs; left out when identities are compared

# Identity keys that say which model a run's checkpoints are of ("model" is rm's before issue 39; resume=force never
# crosses them).
MODEL_KEYS = ("model.path", "model", "model.config_sha256", "model.revision")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _model_hash(path: Path | None) -> str | None:
    cfg = path / "config.json" if path else None
    if cfg is None or not cfg.is_file():
        return None
    return hashlib.sha256(cfg.read_bytes()).hexdigest()[:16]


def identity(kind: str, cfg) -> dict:
    """The settings that make `cfg`'s saved state what it is (paths resolved, the model's config hashed)."""
    values = config_to_dict(cfg)
    out = {k: _get(values, k) for k in IDENTITY_KEYS[kind]}
    model_key = "model.path" if "model.path" in out else "model"
    source = resolve_model(out[model_key]) if out[model_key] else None
    if source is not None:
        out[model_key] = source.hub.repo_id if source.hub else str(source.path.resolve())
    out["model.config_sha256"] = _model_hash(source.path if source else None)
    out["model.revision"] = source.commit if source else None
    if isinstance(out.get("train_data"), list):
        out["train_data"] = [str(Path(p).resolve()) if Path(p).exists() else p for p in out["train_data"]]
    return json.loads(json.dumps(out, default=str))


def claim(output_dir: str | Path, kind: str, cfg, force: bool = False, write: bool = True) -> bool:
    """Claim `output_dir` for this stage (see the module docstring); returns whether it holds an earlier run of
    the same command. `write`: False on processes other than the main one (they only check)."""
    from .checkpoint import clean_leftovers

    out = Path(output_dir)
    mine = {"kind": kind, "identity": identity(kind, cfg)}
    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ConfigError(f"key 'output_dir': {out} exists and is not a directory")
    check_unlocked(out)  # another run's directory is named as such, whatever it holds
    entries = sorted(p.name for p in out.iterdir() if not is_own_scratch(p.name)) if out.is_dir() else []
    resumed = False
    if manifest.is_file():
        try:
            theirs = json.loads(manifest.read_text())
        except ValueError:
            raise ConfigError(f"{manifest}: unreadable; not resuming a run directory align cannot identify") from None
        if theirs.get("kind") == RECIPE_KIND:
            raise ConfigError(f"key 'output_dir': {out} is the run directory of an `align run` recipe ({manifest}); "
                              "its stages have their own directories in it. Choose another output_dir")
        diff = _differences(theirs, mine)
        if diff and entries == [MANIFEST]:  # an attempt that failed before writing anything else: nothing to lose
            if write:
                print(f"{kind}: {out} held only the manifest of an attempt that wrote nothing else; taken over with "
                      "these settings", flush=True)
            diff = None
        if diff and force:
            _refuse_foreign_state(out, theirs, mine, diff)
        if diff and not force:
            shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:6])
            raise ConfigError(f"key 'output_dir': {out} holds another run ({shown}). Rerun with resume=force to "
                              "take it over with these settings, or choose a new output_dir")
        resumed = diff == []
    elif entries:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise ConfigError(f"key 'output_dir': {out} already holds files align did not write ({shown}); choose an "
                          "empty or new directory (align never replaces or deletes what it did not write)")
    if write:
        lock_dir(out)  # (already held under claim_all) creates the directory
        if not resumed:
            from .checkpoint import atomic_write_text

            atomic_write_text(manifest, json.dumps(mine, indent=1))
        for p in clean_leftovers(out):
            print(f"{kind}: removed {p} (left by an interrupted run)", flush=True)
    return resumed


def _refuse_foreign_state(out: Path, theirs: dict, mine: dict, diff: list[tuple[str, object, object]]) -> None:
    """resume=force over a run of another model (or stage kind) whose checkpoint a resume would load: ConfigError
    naming both models, before anything is read or written."""
    if not any(key == "kind" or key in MODEL_KEYS for key, _, _ in diff):
        return
    from .checkpoint import list_checkpoints

    held = list_checkpoints(out)
    if held:
        raise ConfigError(f"key 'resume': resume=force would resume {held[-1]}, the state of {_model_of(theirs)}, "
                          f"as a run of {_model_of(mine)}; a run never continues another model's state. Choose a "
                          "new output_dir for this one")


def _model_of(manifest: dict) -> str:
    """'sft of model PATH (config.json sha256 …)' from a manifest, for messages."""
    ident = manifest.get("identity") or {}
    path = ident.get("model.path", ident.get("model"))
    sha, rev = ident.get("model.config_sha256"), ident.get("model.revision")
    return (f"{manifest.get('kind') or 'a run'} of model {path!r}" + (f" at revision {rev}" if rev else "") +
            (f" (config.json sha256 {sha})" if sha else ""))


def is_own_scratch(name: str) -> bool:
    """Whether a directory entry is align's own bookkeeping (the lock file, a temporary `.NAME.tmp-PID`), never a
    sign that someone else wrote there."""
    return name == LOCK or _OWN_TEMP.match(name) is not None


def _differences(theirs: dict, mine: dict) -> list[tuple[str, object, object]]:
    diff = []
    if theirs.get("kind") != mine["kind"]:
        diff.append(("kind", theirs.get("kind"), mine["kind"]))
    a, b = comparable(theirs.get("identity", {})), comparable(mine["identity"])
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diff.append((key, a.get(key), b.get(key)))
    return diff


def comparable(settings: dict) -> dict:
    """An identity (or a stage's recorded settings) without the reward keys that say how a reward is run, not what
    it scores (`timeout_s`, `isolate`): a run resumes, and a finished stage is reused, after they change, and after
    their defaults did (timeout_s was 0 before issue 40). An rm stage's `model: DIR` from before issue 39 reads as
    what it now is, model.path (model.dtype was always auto): nested in recorded settings, dotted in an identity
    (identities are flat and always have model.config_sha256)."""
    legacy = settings.get("model")
    if isinstance(legacy, str):
        settings = {k: v for k, v in settings.items() if k != "model"}
        if "model.config_sha256" in settings:
            settings["model.path"] = legacy
        else:
            settings["model"] = {"path": legacy, "dtype": "auto"}
    rewards = settings.get("rewards")
    if not isinstance(rewards, list):
        return settings
    return {**settings, "rewards": [{k: v for k, v in r.items() if k not in RUN_ONLY_REWARD_KEYS}
                                 if isinstance(r, dict) else r for r in rewards]}


def claim_all(accelerator, output_dir: str | Path, kind: str, cfg) -> None:
    """`claim` under several processes: every process checks the directory first (so none sees a half-written
    manifest), then the main one locks it (lock.py: the lock is the job's, one per directory) and writes. A refused
    lock is every process's error, so none waits for a main process that stopped."""
    from accelerate.utils import broadcast_object_list

    force = cfg.resume == "force"
    claim(output_dir, kind, cfg, force=force, write=False)
    accelerator.wait_for_everyone()
    refused = [None]
    if accelerator.is_main_process:
        try:
            lock_dir(output_dir)
        except ConfigError as e:
            refused = [str(e)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refused)
    if refused[0] is not None:
        raise ConfigError(refused[0])
    if accelerator.is_main_process:
        claim(output_dir, kind, cfg, force=force)
    accelerator.wait_for_everyone()
