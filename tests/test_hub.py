"""Hub ids as model paths: parsing, resolution from a hub cache laid out in tmp (offline), runs on a hub id."""

import json
import shutil
from pathlib import Path

import pytest

from align.config import ConfigError
from align.model.hub import HubRef, hub_ref, resolve_model
from align.model.policy import check_model_dir, load_tokenizer

from .conftest import DATA

MAIN = "a" * 40   # refs/main
OLD = "b" * 40    # refs/v1 (a tag)


def _snapshot(repo: Path, sha: str, files: Path, blobs: bool) -> None:
    """`snapshots/<sha>/` holding `files`: as symlinks into blobs/ (as the hub client writes them) or as copies."""
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        if blobs:
            blob = repo / "blobs" / f"{sha[:8]}-{f.name}"
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
        else:
            shutil.copyfile(f, snap / f.name)


@pytest.fixture
def hub(tmp_path, tiny_dir, monkeypatch):
    """A hub cache in tmp with acme/tiny-dsv2: main -> MAIN (blob symlinks), tag v1 -> OLD (plain copies, its
    config.json marked so the two commits differ). huggingface_hub read HF_HUB_CACHE at import: its constant is
    patched (the hub client reads the constant at each call)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-dsv2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)  # the client writes the sha with no newline
    (repo / "refs" / "v1").write_text(OLD)
    _snapshot(repo, MAIN, tiny_dir, blobs=True)
    _snapshot(repo, OLD, tiny_dir, blobs=False)
    cfg = json.loads((repo / "snapshots" / OLD / "config.json").read_text())
    (repo / "snapshots" / OLD / "config.json").write_text(json.dumps({**cfg, "align_test_commit": "old"}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("spec, want", [
    ("deepseek-ai/DeepSeek-V2-Lite-Chat", HubRef("deepseek-ai/DeepSeek-V2-Lite-Chat", None)),
    ("acme/tiny-dsv2@main", HubRef("acme/tiny-dsv2", "main")),
    (f"acme/tiny@{MAIN}", HubRef("acme/tiny", MAIN)),
    ("acme/tiny@refs/pr/1", HubRef("acme/tiny", "refs/pr/1")),
    ("gpt2", HubRef("gpt2", None)),
    ("/models/acme/tiny", None), ("./acme/tiny", None), ("~/acme/tiny", None), ("../tiny", None),
    ("runs/sft/final", None),   # more than one '/': a path
    ("acme--x/tiny", None),     # not a valid repo id: a path
])
def test_hub_ref_parsing(spec, want, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_ref(spec) == want


def test_local_paths_win_and_keep_todays_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    assert hub_ref("acme/tiny") is None              # exists: local
    assert hub_ref("acme/other") is None             # its first component exists: local
    assert hub_ref(Path("owner/name")) is None       # a Path object is never a hub id
    with pytest.raises(ConfigError, match=r"^model directory acme/other does not exist$"):
        check_model_dir("acme/other")
    with pytest.raises(ConfigError, match=r"^model directory runs/sft/final does not exist$"):
        check_model_dir("runs/sft/final")
    with pytest.raises(ConfigError, match=r"nothing after '@'"):
        hub_ref("owner/tiny-dsv2@")


def test_hub_id_resolves_to_its_snapshot_by_ref_and_by_sha(hub):
    src = resolve_model("acme/tiny-dsv2")
    assert src.path == hub / "models--acme--tiny-dsv2" / "snapshots" / MAIN and src.commit == MAIN
    assert resolve_model("acme/tiny-dsv2@main").commit == MAIN
    assert resolve_model("acme/tiny-dsv2@v1").commit == OLD
    assert resolve_model(f"acme/tiny-dsv2@{OLD}").commit == OLD
    assert check_model_dir("acme/tiny-dsv2")["model_type"] == "deepseek_v2"
    assert "align_test_commit" not in check_model_dir("acme/tiny-dsv2@main")
    assert check_model_dir("acme/tiny-dsv2@v1")["align_test_commit"] == "old"
    tok = load_tokenizer(f"acme/tiny-dsv2@{MAIN}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("User: hi\n\nAssistant:")


def test_missing_id_names_the_id_revision_and_offline(hub):
    with pytest.raises(ConfigError) as e:
        check_model_dir("acme/missing@v3")
    msg = str(e.value)
    assert "'acme/missing@v3'" in msg and "hub repo acme/missing at revision v3" in msg
    assert f"not in the hub cache {hub.resolve()}" in msg and "HF_HUB_OFFLINE=1 forbids downloading" in msg
    with pytest.raises(ConfigError, match=r"acme/tiny-dsv2 at revision " + "c" * 40 + " is not in the hub cache"):
        check_model_dir("acme/tiny-dsv2@" + "c" * 40)       # a commit the cache does not hold
    with pytest.raises(ConfigError, match=r"acme/tiny-dsv2 at revision v9 is not in the hub cache"):
        check_model_dir("acme/tiny-dsv2@v9")


def test_online_with_the_hub_unreachable_says_so_and_still_uses_the_cache(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    with pytest.raises(ConfigError, match=r"acme/missing at revision main is not in the hub cache .* the hub could "
                                          r"not be reached \(online mode\)"):
        check_model_dir("acme/missing")
    assert resolve_model("acme/tiny-dsv2@v1").commit == OLD   # cached: used although the hub is unreachable


def test_sft_on_a_hub_id_records_the_resolved_revision(hub, tmp_path):
    from align.cli import main

    out = tmp_path / "sft"
    assert main(["sft", "model.path=acme/tiny-dsv2", f"output_dir={out}", f"train_data=[{DATA}/arith/train.jsonl]",
                 "max_steps=2", "batch_size=2", "save_every=1", "eval_every=0"]) == 0
    ident = json.loads((out / "align-run.json").read_text())["identity"]
    assert ident["model.path"] == "acme/tiny-dsv2" and ident["model.revision"] == MAIN
    assert ident["model.config_sha256"] is not None
    assert (out / "final" / "model.safetensors").is_file()
    from align.run.checkpoint import latest_checkpoint, read_state

    assert read_state(latest_checkpoint(out))["model_revision"] == MAIN  # each checkpoint names the commit too
    # the same commit pinned by sha is the same run (resumes, nothing to do); another commit is refused by name
    assert main(["sft", f"model.path=acme/tiny-dsv2@{MAIN}", f"output_dir={out}",
                 f"train_data=[{DATA}/arith/train.jsonl]", "max_steps=2", "batch_size=2", "save_every=1",
                 "eval_every=0"]) == 0
    with pytest.raises(ConfigError, match=rf"model.revision: '{MAIN}' there, '{OLD}' now"):
        from align.config import load_config
        from align.sft import SFTConfig, train_sft

        train_sft(load_config(SFTConfig, None, ["model.path=acme/tiny-dsv2@v1", f"output_dir={out}",
                                                f"train_data=[{DATA}/arith/train.jsonl]", "max_steps=2",
                                                "batch_size=2"]))


def test_grpo_step_on_a_hub_id(hub, tmp_path):
    from align.cli import main

    out = tmp_path / "grpo"
    assert main(["grpo", "model.path=acme/tiny-dsv2@main", f"output_dir={out}",
                 f"train_data=[{DATA}/arith/rl_prompts.jsonl]", "rewards=[{name: exact_answer, weight: 1.0}]",
                 "group_size=2", "prompts_per_step=1", "steps=1", "sampling.max_new_tokens=4"]) == 0
    ident = json.loads((out / "align-run.json").read_text())["identity"]
    assert ident["model.path"] == "acme/tiny-dsv2" and ident["model.revision"] == MAIN
    assert (out / "final" / "config.json").is_file()
