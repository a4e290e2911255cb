import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The default tiny DeepSeek-V2 + tokenizer, built once per test session."""
    from align.tiny import build_tiny

    out = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny(out)
    return out


@pytest.fixture(scope="session")
def quickstart_models(tmp_path_factory) -> dict:
    """The quickstart's own first four stages (tiny, sft, rm_helpful, rm_safety: its data and settings, ~3 min on 2
    cores), run once per test session: {"tiny", "sft", "helpful", "safety"} -> model directory, and "summaries":
    stage name -> the stage's summary."""
    from align.recipe import load_recipe, run_stage

    root = tmp_path_factory.mktemp("quickstart")
    off = [f"stages.{s}.tensorboard=false" for s in ("sft", "rm_helpful", "rm_safety")]
    _, stages, _, _ = load_recipe("quickstart", [f"run_dir={root}", *off])
    out: dict = {"summaries": {}}
    for stage in stages[:4]:
        assert stage.kind in ("tiny", "sft", "rm"), stage
        out["summaries"][stage.name] = run_stage(stage)
        out[stage.name.removeprefix("rm_")] = str(stage.output)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from align.model.policy import load_tokenizer

    return load_tokenizer(tiny_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def interrupted_copy(run: Path, to: Path, last_step: int) -> Path:
    """A copy of a finished run directory as it stood right after the checkpoint of `last_step` was written."""
    import shutil

    from align.run.checkpoint import list_checkpoints

    shutil.copytree(run, to)
    for ck in list_checkpoints(to):
        if int(ck.name.split("-")[1]) > last_step:
            shutil.rmtree(ck)
    shutil.rmtree(to / "final")
    lines = (to / "metrics.jsonl").read_text().splitlines()
    (to / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= last_step))
    return to
