"""`align run RECIPE --check`: what a recipe needs from outside it, looked at before any run, beyond what
`load_recipe` validates (keys, types, values, local paths).

    model paths   a local directory: readable as a checkpoint (`policy.check_model_dir`), and for sft / grpo a
                  policy (a reward model's classifier is refused); a hub id: in the hub cache, or else, online,
                  known to the hub (`hub.probe`: an error under HF_HUB_OFFLINE=1, where the run would refuse it; a
                  warning when the hub cannot be reached from here)
    judge URLs    each `judge` reward's endpoint answers (a warning when it does not: a judge server is often started
                  after the check, but the run's first scoring fails without it)

Findings are (level, key, message), level "error" (the run would stop) or "warning" (it may); models made by an
earlier stage are not probed.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError
from .model.hub import hub_ref, probe
from .model.policy import check_model_dir


def probe_recipe(stages) -> list[tuple[str, str, str]]:
    """The findings for a loaded recipe's stages (`recipe.load_recipe`), in stage order."""
    from rewards.judge import unreachable

    made = {str(s.output) for s in stages}
    out: list[tuple[str, str, str]] = []
    for stage in stages:
        model = getattr(stage.config, "model", None)
        path = getattr(model, "path", None)
        key = f"stages.{stage.name}.model.path"
        if isinstance(path, str) and path not in made:
            ref = hub_ref(path)
            if ref is not None:
                level, message = probe(ref)
                if level != "ok":
                    out.append((level, key, message))
            elif Path(path).is_dir():
                try:
                    check_model_dir(path, policy=stage.kind in ("sft", "grpo"))
                except ConfigError as e:
                    out.append(("error", key, str(e)))
        for i, spec in enumerate(getattr(stage.config, "rewards", None) or []):
            url = spec.args.get("url") if spec.name == "judge" else None
            if not isinstance(url, str):
                continue
            try:
                why = unreachable(url)
            except ValueError as e:  # not an http(s) URL
                out.append(("error", f"stages.{stage.name}.rewards[{i}].args.url", str(e)))
                continue
            if why:
                out.append(("warning", f"stages.{stage.name}.rewards[{i}].args.url",
                            f"the judge does not answer ({why}); start it before the stage runs"))
    return out
