"""Weights & Biases for a stage (`wandb: {project, name, tags}` in its config, or the WANDB_PROJECT environment
variable): the run's settings as the W&B config, its metrics as they are logged.

Run identity follows align's, not the directory name: a new run gets a fresh W&B id, kept in OUTPUT/.align-wandb.json;
a run align resumes continues that id; two experiments written one after the other into the same directory (the
second with resume=force) are two W&B runs. Asked for and not installed is an error before any work, never a
silent no-op. WANDB_MODE=offline works as W&B documents it (`wandb sync` later).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import uuid
from pathlib import Path

from ..config import ConfigError, option

ID_FILE = ".align-wandb.json"


@dataclasses.dataclass
class WandbConfig:
    project: str = option("", "Weights & Biases project for the metrics and the run's settings ('': off, unless the "
                              "WANDB_PROJECT environment variable names one).")
    name: str = option("", "The W&B run's name ('': the output directory's name).")
    tags: list[str] = option(factory=list, help="The W&B run's tags.")

    def chosen_project(self) -> str:
        return self.project or os.environ.get("WANDB_PROJECT", "")

    def validate(self) -> None:
        if self.chosen_project() and importlib.util.find_spec("wandb") is None:
            where = "key 'wandb.project'" if self.project else "the WANDB_PROJECT environment variable"
            raise ConfigError(f"{where} asks for Weights & Biases, which is not installed here (pip install wandb, "
                              "or leave it unset)")


def start_wandb(cfg: WandbConfig, output_dir: str | Path, settings: dict, resumed: bool):
    """The W&B run of this stage (None when off): resumed runs continue their recorded id, new runs get a new one."""
    project = cfg.chosen_project()
    if not project:
        return None
    cfg.validate()
    import wandb

    out = Path(output_dir)
    record = out / ID_FILE
    run_id = None
    if resumed and record.is_file():
        run_id = json.loads(record.read_text()).get("id")
    if run_id is None:
        from .checkpoint import atomic_write_text

        run_id = uuid.uuid4().hex[:12]
        atomic_write_text(record, json.dumps({"id": run_id, "project": project}))
    return wandb.init(project=project, name=cfg.name or out.name, tags=cfg.tags or None, id=run_id,
                      resume="allow" if resumed else None, config=settings, dir=str(out))
