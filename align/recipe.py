"""`align run RECIPE [key=value ...]`: run a chain of stages (tiny / sft / rm / grpo) from one YAML recipe.

    run_dir: runs/quickstart
    eval: {reasoning: "{data}/arith/heldout.jsonl", reward_models: {safety: "@rm_safety"}, ...}
    stages:
      sft:       {kind: sft, model: {path: "@tiny"}, train_data: [...], ...}
      reasoning: {kind: grpo, model: {path: "@sft"}, rewards: [{name: math}], ...}

Each stage takes its kind's config keys (see `align sft --help-config` etc.) except `output_dir`, which is
RUN_DIR/<stage>. A string "@name" stands for the output model of an earlier stage; "{data}" for the bundled data
directory. RECIPE is a file path or the name of a bundled recipe (`align run quickstart`). Overrides address keys
with dots: `stages.sft.epochs=2`, `run_dir=/tmp/x`.

Everything is validated before the first stage starts (unknown keys, types, values, data files that do not exist,
unknown rewards, references to stages that do not come earlier), with the file, line and key named. Running the same
command again skips finished stages and resumes an interrupted one from its last checkpoint. One `align run` at a
time per run directory: it is locked before the first write (align/run/lock.py), as each stage locks its own, and
claimed as a stage claims its output_dir (`claim_run_dir`: RUN_DIR/align-run.json; a directory holding files align
did not write is refused, never overwritten).
After each stage that makes a policy (or, where reward model stages follow it, after them, so it is scored once
with those RMs), `align eval` runs (EvalConfig) and its figures go to RUN_DIR/<stage>/eval.json; at the end each
component of the last GRPO stage's reward is scored on every policy's held-out helpful / harmful answers (stage 2 as
the paper frames it: `reward_components` in eval.json), and RUN_DIR/report.md and its plots summarise the run. A
reward model's eval.json gives its held-out pairs ranked right by the kind of rejected side (gibberish, off-topic, ...).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, build_config, directory_path, merge_dicts, parse_overrides, read_yaml, where
from .model.hub import hub_ref
from .rerun import REPLACED, plan_reruns, portable_settings, write_record
from .resources import data_dir, recipes_dir
from .rollout.protocol import RolloutConfig
from .run.checkpoint import atomic_write_text
from .run.formats import check_source
from .run.lock import lock_dir, unlock_dir
from .run.metrics import strict_json

_NAME = r"[A-Za-z0-9_\-]+"  # a stage's name: also its directory RUN_DIR/<name>, so never a path
_REF = re.compile(rf"^@({_NAME})$")


@dataclasses.dataclass
class Stage:
    name: str
    kind: str
    config: object                      # the kind's config dataclass, references resolved
    output: Path                        # the model directory the stage leaves for later stages


def _kinds() -> dict[str, tuple[type, Callable, Callable[[Path], Path]]]:
    """kind -> (config class, runner, the model directory it leaves in its output_dir)."""
    from .grpo.config import GRPOConfig
    from .grpo.loop import train_grpo
    from .rm import RMConfig, train_rm
    from .sft import SFTConfig, train_sft
    from .tiny import TinyConfig, build_tiny

    def tiny(cfg):
        return build_tiny(cfg.output_dir, cfg.preset, cfg.seed)

    return {"tiny": (TinyConfig, tiny, lambda d: d), "sft": (SFTConfig, train_sft, lambda d: d / "final"),
            "rm": (RMConfig, train_rm, lambda d: d / "final"), "grpo": (GRPOConfig, train_grpo, lambda d: d / "final")}


def run_stage(stage: Stage) -> dict:
    """Run one stage of a loaded recipe (`load_recipe`), without the evaluation `run_recipe` adds; returns the
    stage's own summary."""
    return _kinds()[stage.kind][1](stage.config)


def resolve_recipe_path(recipe: str) -> Path:
    path = Path(recipe)
    if path.is_file():
        return path
    bundled = recipes_dir() / f"{recipe}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    raise ConfigError(f"recipe {recipe!r} is neither a file nor a bundled recipe ({', '.join(known)})")


def _substitute(value, data: str, outputs: dict[str, Path], source: str, key: str, lines: dict[str, int]):
    """Replace {data} and @stage references in every string of a stage's values."""
    if isinstance(value, dict):
        return {k: _substitute(v, data, outputs, source, f"{key}.{k}", lines) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, data, outputs, source, f"{key}[{i}]", lines) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    m = _REF.match(value)
    if m:
        if m.group(1) not in outputs:
            raise ConfigError(f"{where(source, lines, key.split('[')[0])}: key '{key}' refers to '{value}', which no "
                              f"earlier stage makes (earlier stages: {', '.join(outputs) or 'none'})")
        return str(outputs[m.group(1)])
    return value.replace("{data}", data)


def _check_paths(cfg, stage_key: str, source: str, lines: dict[str, int], made: set[str]) -> None:
    """Data files and model directories named by a stage must exist, unless an earlier stage makes them."""
    model = getattr(cfg, "model", None)
    model_path = getattr(model, "path", model)
    if (isinstance(model_path, str) and model_path not in made and not Path(model_path).is_dir()
            and hub_ref(model_path) is None):
        key = f"{stage_key}.model.path" if hasattr(model, "path") else f"{stage_key}.model"
        raise ConfigError(f"{where(source, lines, key)}: key '{key}': model directory {model_path} does not exist")
    for field in ("train_data", "eval_data"):
        for i, path in enumerate(getattr(cfg, field, None) or []):
            problem = check_source(path)  # a local file, or a hub dataset id (only checked when loaded)
            if problem:
                raise ConfigError(f"{where(source, lines, stage_key + '.' + field)}: key '{stage_key}.{field}[{i}]': "
                                  f"{problem}")


def _run_dir(values: dict, path: Path, source: str, lines: dict[str, int]) -> str:
    """The recipe's run_dir (default runs/<recipe name>), `~` and variables expanded; an empty one is refused."""
    if "run_dir" not in values:
        return f"runs/{path.stem}"
    value = values["run_dir"]
    if not isinstance(value, str):
        raise ConfigError(f"{where(source, lines, 'run_dir')}: key 'run_dir' must be a directory path, got {value!r}")
    try:
        return directory_path(value, "run_dir")
    except ConfigError as e:
        raise ConfigError(f"{where(source, lines, 'run_dir')}: {e}") from None


def load_recipe(recipe: str, overrides: list[str] | None = None) -> tuple[Path, list[Stage], object, dict]:
    """Parse and validate a recipe; returns (run_dir, stages, eval config or None, raw values)."""
    from .evaluate import EvalConfig

    path = resolve_recipe_path(recipe)
    values, lines = read_yaml(path)
    values = merge_dicts(values, parse_overrides(overrides or []))
    source = f"{path} + overrides" if overrides else str(path)
    unknown = sorted(set(values) - {"run_dir", "stages", "eval", "description", "rollout"})
    if unknown:
        raise ConfigError(f"{where(source, lines, unknown[0])}: unknown key '{unknown[0]}'; a recipe has "
                          f"run_dir, description, eval, rollout, stages")
    rollout = values.get("rollout") or {}  # defaults for every grpo stage's `rollout` (e.g. rollout.engine=vllm)
    if not isinstance(rollout, dict):
        raise ConfigError(f"{where(source, lines, 'rollout')}: key 'rollout' must be a mapping, got {rollout!r}")
    build_config(RolloutConfig, dict(rollout), source, lines, prefix="rollout.")
    stages_raw = values.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"{source}: key 'stages' must be a mapping of stage name -> settings")
    run_dir = Path(_run_dir(values, path, source, lines))
    data, kinds = str(data_dir()), _kinds()
    outputs: dict[str, Path] = {}
    stages = []
    for name, raw in stages_raw.items():
        key = f"stages.{name}"
        if not isinstance(name, str) or not re.fullmatch(_NAME, name):
            raise ConfigError(f"{where(source, lines, key)}: key '{key}': a stage name must be a plain name (letters, "
                              f"digits, _ and -): it names the directory run_dir/<name>, got {name!r}")
        if not isinstance(raw, dict) or raw.get("kind") not in kinds:
            got = raw.get("kind") if isinstance(raw, dict) else raw
            raise ConfigError(f"{where(source, lines, key)}: key '{key}.kind' must be one of {sorted(kinds)}, "
                              f"got {got!r}")
        cls, _, output_of = kinds[raw["kind"]]
        settings = {k: v for k, v in raw.items() if k != "kind"}
        if raw["kind"] == "grpo" and rollout:
            settings["rollout"] = merge_dicts(rollout, settings.get("rollout") or {})
        if "output_dir" in settings:
            raise ConfigError(f"{where(source, lines, key + '.output_dir')}: key '{key}.output_dir' is set by "
                              f"the recipe (run_dir/{name}); remove it")
        settings = _substitute(settings, data, outputs, source, key, lines)
        settings["output_dir"] = str(run_dir / name)
        cfg = build_config(cls, settings, source, lines, prefix=key + ".")
        _check_paths(cfg, key, source, lines, {str(p) for p in outputs.values()})
        outputs[name] = output_of(run_dir / name)
        stages.append(Stage(name, raw["kind"], cfg, outputs[name]))
    eval_cfg = None
    if values.get("eval"):
        ev = _substitute(values["eval"], data, outputs, source, "eval", lines)
        eval_cfg = build_config(EvalConfig, ev, source, lines, prefix="eval.")
        for field in ("reasoning", "helpful", "safety", "code"):
            problem = getattr(eval_cfg, field) and check_source(getattr(eval_cfg, field))
            if problem:
                raise ConfigError(f"{where(source, lines, 'eval.' + field)}: key 'eval.{field}': {problem}")
    return run_dir, stages, eval_cfg, values


_PLOTS = re.compile(rf"^(stages|accuracy|(rewards|kl|tools)_{_NAME})\.png$")  # report.py's plots


def _legacy_run_dir(run_dir: Path, entries: list[str], stages: list[Stage]) -> bool:
    """Whether a run directory without a manifest is one an `align run` from before manifests made: its recipe.json
    is a recipe's values, at least one stage directory is there, and every entry is a name such a run writes."""
    try:
        values = json.loads((run_dir / "recipe.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(values, dict) or not isinstance(values.get("stages"), dict):
        return False
    names = {s.name for s in stages} | {str(n) for n in values["stages"]}
    own = {"recipe.json", "report.md", REPLACED, *names}
    return (any((run_dir / n).is_dir() for n in names if n in entries)
            and all(e in own or _PLOTS.match(e) for e in entries))


def claim_run_dir(run_dir: Path, stages: list[Stage], write: bool = True) -> None:
    """Claim RUN_DIR for `align run` as a stage claims its output_dir (align/run/rundir.py), before any write:
      * missing or empty: RUN_DIR/align-run.json records it as a recipe's run directory (`write`);
      * holding that manifest: the run continues (its stages claim their own directories);
      * holding another manifest (a stage's output_dir) or files align did not write (a user's report.md or
        recipe.json): refused, naming them; align never overwrites what it did not write.
    A run directory made before manifests (recipe.json, stage directories, report and plots only) is taken as one.
    The lock file and align's temporary names are its own, never a stranger's. `write`: False only checks."""
    from .run.lock import check_unlocked
    from .run.rundir import MANIFEST, RECIPE_KIND, is_own_scratch

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"key 'run_dir': {run_dir} exists and is a file, not a directory")
    check_unlocked(run_dir, "run_dir")
    manifest = run_dir / MANIFEST
    entries = sorted(p.name for p in run_dir.iterdir() if not is_own_scratch(p.name)) if run_dir.is_dir() else []
    if manifest.is_file():
        try:
            kind = json.loads(manifest.read_text()).get("kind")
        except (ValueError, AttributeError):
            raise ConfigError(f"{manifest}: unreadable; not running in a directory align cannot identify") from None
        if kind != RECIPE_KIND:
            raise ConfigError(f"key 'run_dir': {run_dir} is the output_dir of an `align {kind}` run ({manifest}), "
                              "not a recipe's run directory; choose another run_dir")
        return
    if entries and not _legacy_run_dir(run_dir, entries, stages):
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise ConfigError(f"key 'run_dir': {run_dir} already holds files align did not write ({shown}); choose an "
                          "empty or new directory (align never replaces or deletes what it did not write)")
    if write:
        atomic_write_text(manifest, json.dumps({"kind": RECIPE_KIND}, indent=1))


def _eval_dtype(stage: Stage, eval_cfg) -> str:
    """eval.dtype, or where it is auto the dtype the stage trained with (its model.dtype; a tiny stage: auto)."""
    model = getattr(stage.config, "model", None)
    return eval_cfg.dtype if eval_cfg.dtype != "auto" else getattr(model, "dtype", "auto")


def _evaluate_stage(stage: Stage, run_dir: Path, eval_cfg, evaluate) -> None:
    """(Re-)evaluate a finished policy stage when its eval.json is missing or was measured with other eval
    settings (e.g. before an RM it can now be scored with existed)."""
    ready = {k: v for k, v in eval_cfg.reward_models.items() if (Path(v) / "config.json").is_file()}
    cfg = dataclasses.replace(eval_cfg, reward_models=ready, dtype=_eval_dtype(stage, eval_cfg))
    settings = portable_settings(cfg, run_dir)
    result_file = run_dir / stage.name / "eval.json"
    old = json.loads(result_file.read_text()) if result_file.is_file() else None
    if old is not None and old.get("eval_settings") == settings:
        return
    result = {**evaluate(str(stage.output), cfg), "eval_settings": settings}
    atomic_write_text(result_file, strict_json(result, indent=1))
    shown = ", ".join(f"{k[5:]} {v:.3f}" for k, v in result.items() if k.startswith("eval/"))
    print(f"run: eval of '{stage.name}' ({result['device']}, {result['dtype']}): {shown}", flush=True)


def _rank_by_kind(stage: Stage, run_dir: Path, eval_cfg) -> None:
    """A reward model's held-out pairs (its eval_data) ranked right, r(chosen) > r(rejected), by the kind of their
    rejected side (the `rejected_kind` column of the bundled pairs: wrong, comply, over_refusal, gibberish, ...;
    "pairs" where a row has none): RUN_DIR/<stage>/eval.json {"pair_accuracy_by_kind", "pairs_by_kind"}."""
    from rewards.model import ClassifierReward

    from .rm import load_pairs
    from .run.data import load_rows

    result_file = run_dir / stage.name / "eval.json"
    if result_file.is_file() or not stage.config.eval_data:
        return
    rm = ClassifierReward(str(stage.output), device=eval_cfg.device if eval_cfg else "auto",
                          dtype=eval_cfg.dtype if eval_cfg else "auto")
    right: dict[str, list[bool]] = {}
    for path in stage.config.eval_data:
        pairs = load_pairs(path, rm.tokenizer)
        kinds = [row.get("rejected_kind") or "pairs" for row in load_rows(path)]
        scores = rm.scores([c for c, _ in pairs] + [r for _, r in pairs])
        for kind, chosen, rejected in zip(kinds, scores[:len(pairs)], scores[len(pairs):]):
            right.setdefault(kind, []).append(chosen > rejected)
    result = {"pair_accuracy_by_kind": {k: sum(v) / len(v) for k, v in right.items()},
              "pairs_by_kind": {k: len(v) for k, v in right.items()}}
    atomic_write_text(result_file, strict_json(result, indent=1))
    shown = ", ".join(f"{k} {v:.0%}" for k, v in result["pair_accuracy_by_kind"].items())
    print(f"run: held-out pairs of '{stage.name}' ranked right, by rejected kind: {shown}", flush=True)


def _heldout_preference_rows(eval_cfg) -> list:
    """The held-out helpful and harmful prompts, in the order evaluate() answers them (eval.limit applied)."""
    from .run.data import load_prompts

    return [r for kind in ("helpful", "safety") if getattr(eval_cfg, kind) and eval_cfg.reward_models.get(kind)
            for r in load_prompts(getattr(eval_cfg, kind))[:eval_cfg.limit or None]]


def _nan_mean(values) -> float | None:
    """Mean of the finite entries of a tensor; None when there are none."""
    kept = values[~values.isnan()]
    return kept.mean().item() if kept.numel() else None


def _score_components(stages: list[Stage], run_dir: Path, eval_cfg) -> None:
    """Stage 2 as the paper frames it: each component of the last GRPO stage's reward (RM_helpful, RM_safety,
    RM_rule in the quickstart) scored on every evaluated policy's greedy answers to the held-out helpful and harmful
    prompts (from its eval.json), stored there as `reward_components` (weights, mean per component, weighted sum,
    n). Left out when that reward needs a column the held-out rows lack (a recipe that ends with a reasoning stage)."""
    from rewards.combine import RewardError, check_columns, close_rewards, score

    last = next((s for s in reversed(stages) if s.kind == "grpo"), None)
    rows = _heldout_preference_rows(eval_cfg) if last else []
    if not rows:
        return
    specs = [dataclasses.replace(s) for s in last.config.rewards]  # fresh: the stage closed its own rewards
    try:
        check_columns(specs, [r.columns for r in rows])
    except RewardError as e:
        print(f"run: no stage-2 reward components on held-out prompts ({e})", flush=True)
        return
    columns = {k: [r.columns.get(k) for r in rows] for k in {k for r in rows for k in r.columns}}
    try:
        for stage in (s for s in stages if s.kind in ("tiny", "sft", "grpo")):
            result_file = run_dir / stage.name / "eval.json"
            ev = json.loads(result_file.read_text()) if result_file.is_file() else {}
            answers = [c for kind in ("helpful", "safety") for c in ev.get("completions", {}).get(kind, [])]
            if len(answers) != len(rows) or ev.get("reward_components", {}).get("stage") == last.name:
                continue
            scores = score(specs, [r.messages for r in rows], answers, columns, columns["row"])
            ev["reward_components"] = {"stage": last.name, "n": len(rows),
                                       "weights": {s.key: s.weight for s in specs},
                                       "means": {k: _nan_mean(v) for k, v in scores.components.items()},
                                       "total": _nan_mean(scores.total)}
            atomic_write_text(result_file, strict_json(ev, indent=1))
    finally:
        close_rewards(specs)


def run_recipe(recipe: str, overrides: list[str] | None = None, rerun_from: str | None = None) -> dict:
    """Run every stage not finished yet (and, with `rerun_from`, that stage and every later one again: see
    align/rerun.py), evaluate after each policy stage, write the report."""
    from .evaluate import evaluate
    from .report import write_report
    from .run.allocator import free_device_memory, release_freed_memory

    run_dir, stages, eval_cfg, values = load_recipe(recipe, overrides)  # all validation before any work
    claim_run_dir(run_dir, stages, write=False)  # a directory holding others' files: refused here
    plan = plan_reruns(run_dir, stages, rerun_from)  # a finished stage with other settings: refused here
    lock_dir(run_dir, "run_dir")  # one `align run` per run directory (align/run/lock.py); creates it
    claim_run_dir(run_dir, stages)  # again under the lock, and RUN_DIR/align-run.json written
    plan.move_aside(stages)
    atomic_write_text(run_dir / "recipe.json", json.dumps(values, indent=1, default=str))
    summary: dict = {"run_dir": str(run_dir), "stages": {}}
    done: list[Stage] = []
    for i, stage in enumerate(stages):
        if plan.finished(stage):
            print(f"run: stage '{stage.name}' already finished with these settings ({stage.output})", flush=True)
        else:
            print(f"run: stage '{stage.name}' ({stage.kind})", flush=True)
            run_stage(stage)
            write_record(stage, run_dir, stages[:i])
            free_device_memory()  # its eval and the next stage start from what is live, not from its peak
            release_freed_memory()
        done.append(stage)
        if stage.kind == "rm":
            _rank_by_kind(stage, run_dir, eval_cfg)
        next_is_rm = i + 1 < len(stages) and stages[i + 1].kind == "rm"
        if eval_cfg is not None and not next_is_rm:  # new policies, and earlier ones once an RM they lack exists
            for policy in (s for s in done if s.kind in ("tiny", "sft", "grpo")):
                _evaluate_stage(policy, run_dir, eval_cfg, evaluate)
    if eval_cfg is not None:
        _score_components(stages, run_dir, eval_cfg)
    for stage in stages:
        result_file = run_dir / stage.name / "eval.json"
        if result_file.is_file():
            summary["stages"][stage.name] = json.loads(result_file.read_text())
    summary["report"] = str(write_report(run_dir, [(s.name, s.kind) for s in stages]))
    print(f"run: report at {summary['report']}", flush=True)
    unlock_dir(run_dir)
    return summary
