"""Recipes: every shipped one validates; bad recipes are refused before any work; a shortened quickstart runs;
SIGKILL during GRPO stage 1 then the same command resumes from stage 1's last checkpoint and finishes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from align.config import ConfigError
from align.recipe import load_recipe, run_recipe

from .conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# The quickstart cut to seconds per stage (same stages, same code paths).
SHORT = ["stages.sft.max_steps=40", "stages.sft.eval_every=0", "stages.rm_helpful.epochs=1",
         "stages.rm_safety.epochs=1", "stages.reasoning.steps=2", "stages.reasoning.prompts_per_step=4",
         "stages.reasoning.group_size=4", "stages.reasoning.eval_every=0", "stages.reasoning.eval_data=[]",
         "stages.preference.steps=2", "stages.preference.prompts_per_step=4", "stages.preference.group_size=4",
         "stages.preference.eval_data=[]", "eval.limit=8", "eval.max_new_tokens=16"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_validates(path, tiny_dir):
    values = yaml.safe_load(path.read_text())
    assert "stages" in values, f"{path.name}: recipes/ holds run recipes only"
    # the real-model recipes name a placeholder checkpoint directory: give them one that exists
    first = next(iter(values["stages"]))
    model = values["stages"][first].get("model", {})
    extra = [f"stages.{first}.model.path={tiny_dir}"] if isinstance(model, dict) and not str(
        model.get("path", "@")).startswith("@") else []
    run_dir, stages, _, _ = load_recipe(str(path), extra)
    assert stages and all(s.output.is_relative_to(run_dir) for s in stages)


def test_accelerate_configs_parse():
    for name in ("fsdp2", "zero3"):
        cfg = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{name}.yaml").read_text())
        assert cfg["distributed_type"] in ("FSDP", "DEEPSPEED") and cfg["num_processes"] >= 1


@pytest.mark.parametrize("override,message", [
    ("stages.sft.lrr=1", r"quickstart.yaml \+ overrides: unknown key 'stages.sft.lrr' \(did you mean 'stages.sft.lr'"),
    ("stages.sft.train_data=[missing.jsonl]", r"key 'stages.sft.train_data\[0\]': data file missing.jsonl does not"),
    ("stages.reasoning.rewards=[{name: math, weight: 1}, {name: mth, weight: 2}]",
     r"\(stages.reasoning\): key 'rewards\[1\].name': unknown reward 'mth'"),
    ("stages.sft.model.path=@preference", r"quickstart.yaml \+ overrides:\d+: key 'stages.sft.model.path' refers to "
                                          r"'@preference', which no earlier stage makes"),
    ("stages.rm_safety.kind=dpo", r"key 'stages.rm_safety.kind' must be one of"),
    ("runn_dir=x", r"unknown key 'runn_dir'"),
    # a stage that only an override makes has no line: the message names the overrides, never "?"
    ("stages.extra.model=@sft", r"quickstart.yaml \+ overrides: key 'stages.extra.kind' must be one of"),
    ("stages.reasoning.group_size=1", r"key 'group_size' must be >= 2"),
    ("rollout.engin=vllm", r"unknown key 'rollout.engin' \(did you mean 'rollout.engine'"),
    ("rollout.engine=sglang", r"rollout.engine"),
    ("rollout.gpu_memory_utilization=1.5", r"key 'rollout.gpu_memory_utilization' must be in \(0, 1\]"),
])
def test_bad_recipes_are_refused_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_recipe("quickstart", [f"run_dir={tmp_path}/run", override])
    assert not (tmp_path / "run").exists()


def test_line_numbers_in_recipe_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nstages:\n  t:\n    kind: tiny\n    presett: tiny\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:5: unknown key 'stages.t.presett'"):
        load_recipe(str(bad))


def test_short_quickstart_runs_every_stage_and_writes_the_report(tmp_path):
    summary = run_recipe("quickstart", [f"run_dir={tmp_path}/qs", *SHORT])
    run = tmp_path / "qs"
    for stage in ("tiny", "sft", "rm_helpful", "rm_safety", "reasoning", "preference"):
        assert (run / stage).is_dir(), stage
    final = summary["stages"]["preference"]
    assert {"eval/accuracy", "eval/rule_pass", "eval/helpful_rm", "eval/safety_rm"} <= set(final)
    assert "eval/safety_rm" in summary["stages"]["sft"]  # re-evaluated once RM_safety existed
    report = (run / "report.md").read_text()
    assert "| preference | grpo |" in report and "rewards_preference.png" in report
    assert (run / "stages.png").stat().st_size > 1000
    for png in re.findall(r"\(([\w./-]+\.png)\)", report):  # every figure the report shows is there; a series
        assert (run / png).stat().st_size > 1000                # flat over the run has none (named in the report)
    rows = [json.loads(x) for x in (run / "preference" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward/helpful", "reward/safety", "reward/rule"} <= set(rows[0])


KILL_RECIPE = """
run_dir: {run}
stages:
  tiny: {{kind: tiny}}
  sft:
    kind: sft
    model: {{path: "@tiny"}}
    train_data: ["{{data}}/arith/train.jsonl"]
    max_steps: 10
    lr: 2.0e-3
    tensorboard: false
  reasoning:
    kind: grpo
    model: {{path: "@sft"}}
    train_data: ["{{data}}/arith/rl_prompts.jsonl"]
    rewards: [{{name: math}}]
    group_size: 4
    prompts_per_step: 4
    steps: 12
    lr: 1.0e-4
    sampling: {{max_new_tokens: 16}}
    save_every: 1
    eval_every: 0
    tensorboard: false
"""


def test_sigkill_in_stage_one_then_the_same_command_resumes(tmp_path):
    recipe = tmp_path / "short.yaml"
    recipe.write_text(KILL_RECIPE.format(run=tmp_path / "run"))
    cmd = [sys.executable, "-m", "align", "run", str(recipe)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    ckpts = tmp_path / "run" / "reasoning" / "checkpoints"

    def saved() -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if (p / "state.json").is_file())

    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and not any(s >= 3 for s in saved()):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = saved()
    assert done and done[-1] < 12, "the kill should land inside stage 1"
    assert not (tmp_path / "run" / "reasoning" / "final").exists()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stage 'sft' already finished" in out.stdout
    assert f"resuming at step {done[-1]}" in out.stdout
    assert (tmp_path / "run" / "reasoning" / "final" / "config.json").is_file()
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "reasoning" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 12 and set(range(1, 13)) <= set(steps)


def test_a_recipe_wide_rollout_setting_reaches_every_grpo_stage(tmp_path):
    _, stages, _, _ = load_recipe("quickstart", [f"run_dir={tmp_path}/run", "rollout.kv_cache_gb=0.25",
                                                 "stages.preference.rollout.kv_cache_gb=0.5"])
    grpo = {s.name: s.config.rollout.kv_cache_gb for s in stages if s.kind == "grpo"}
    assert grpo == {"reasoning": 0.25, "preference": 0.5}  # a stage's own setting wins


def test_vllm_engine_where_vllm_is_missing_is_refused_before_any_work(tmp_path, monkeypatch):
    import align.rollout.vllm as engine

    monkeypatch.setattr(engine, "vllm_missing", lambda: "vLLM is not usable here (ImportError: no module)")
    with pytest.raises(ConfigError, match=r"key 'rollout.engine' must be an engine installed here; vLLM is not"):
        run_recipe("quickstart", [f"run_dir={tmp_path}/run", "rollout.engine=vllm"])
    assert not (tmp_path / "run").exists()


def test_rollout_replay_on_a_vllm_without_routes_is_refused_before_any_work(tmp_path, monkeypatch):
    import align.rollout.vllm as engine

    monkeypatch.setattr(engine, "vllm_missing", lambda: None)
    monkeypatch.setattr(engine, "routed_experts_missing",
                        lambda: "vLLM 0.1 has no enable_return_routed_experts (it returns no MoE routes)")
    with pytest.raises(ConfigError, match=r"\(stages.reasoning\): key 'routing_replay' must be none or old "
                                          r"with rollout.engine=vllm here; vLLM 0.1 has no enable_return_routed"):
        run_recipe("quickstart", [f"run_dir={tmp_path}/run", "rollout.engine=vllm",
                                  "stages.reasoning.routing_replay=rollout"])
    assert not (tmp_path / "run").exists()


RERUN_RECIPE = """
run_dir: {run}
eval: {{reasoning: "{{data}}/arith/heldout.jsonl", limit: 4, max_new_tokens: 4}}
stages:
  tiny: {{kind: tiny}}
  sft:
    kind: sft
    model: {{path: "@tiny", dtype: bfloat16}}
    train_data: ["{{data}}/arith/train.jsonl"]
    max_steps: 2
    lr: 2.0e-3
    tensorboard: false
"""


def test_recipe_reruns_like_make_and_evaluates_in_the_stage_dtype(tmp_path, capsys):
    from align.recipe import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RERUN_RECIPE.format(run=tmp_path / "run"))
    run = tmp_path / "run"
    run_recipe(str(recipe))
    ev = json.loads((run / "sft" / "eval.json").read_text())
    assert (ev["device"], ev["dtype"]) == ("cpu", "bfloat16")  # the dtype sft trained in, on this machine's device
    assert "run: eval of 'sft' (cpu, bfloat16)" in capsys.readouterr().out
    first = json.loads((run / "sft" / "align-stage.json").read_text())
    # a changed setting of a finished stage: refused, naming the key and both values; nothing rewritten
    with pytest.raises(ConfigError, match=r"stage 'sft' finished with other settings \(lr: 0.002 then, 0.01 now\)"
                                          r".*--from sft"):
        run_recipe(str(recipe), ["stages.sft.lr=1e-2"])
    assert json.loads((run / "recipe.json").read_text())["stages"]["sft"]["lr"] == 2.0e-3
    # settings that change nothing the stage makes: reused as it is
    run_recipe(str(recipe), ["stages.sft.log_every=1"])
    assert "stage 'sft' already finished with these settings" in capsys.readouterr().out
    # --from sft: the earlier sft moves aside, sft reruns with the new lr, recipe.json names what ran
    run_recipe(str(recipe), ["stages.sft.lr=1e-2"], rerun_from="sft")
    assert float(json.loads((run / "recipe.json").read_text())["stages"]["sft"]["lr"]) == 1e-2
    second = json.loads((run / "sft" / "align-stage.json").read_text())
    assert second["settings"]["lr"] == 1e-2 and second["stamp"] != first["stamp"]
    assert second["inputs"] == {"tiny": json.loads((run / "tiny" / "align-stage.json").read_text())["stamp"]}
    moved = list((run / ".replaced").glob("*/sft/align-stage.json"))
    assert [json.loads(p.read_text())["stamp"] for p in moved] == [first["stamp"]]  # kept, never deleted
    # an upstream stage rerun behind the recipe's back (its stamp changed): sft was made from its earlier output
    record = run / "tiny" / "align-stage.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "stamp": "other"}))
    with pytest.raises(ConfigError, match="it was made from an earlier output of stage 'tiny'"):
        run_recipe(str(recipe), ["stages.sft.lr=1e-2"])
    with pytest.raises(ConfigError, match="--from 'nope': the recipe has no such stage"):
        run_recipe(str(recipe), rerun_from="nope")


def test_eval_device_and_dtype_reach_the_models(tiny_dir, monkeypatch):
    import torch

    from align import evaluate as ev
    from align.model import policy

    seen = {}
    real = policy.load_policy

    def spy(cfg, device, trainable=True, **kw):
        seen.update(device=torch.device(device), dtype=cfg.dtype)
        return real(cfg, device, trainable=trainable, **kw)

    monkeypatch.setattr(policy, "load_policy", spy)
    cfg = ev.EvalConfig(reasoning=str(ROOT / "data" / "arith" / "heldout.jsonl"), limit=2, max_new_tokens=2,
                        dtype="bfloat16")
    out = ev.evaluate(str(tiny_dir), cfg)
    assert seen == {"device": torch.device("cpu"), "dtype": "bfloat16"} and out["dtype"] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ev.eval_device("auto") == torch.device("cuda")  # on a GPU machine the default is the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="key 'device'"):
        ev.EvalConfig(device="cuda").validate()


def test_a_finished_grpo_stage_is_reused_after_a_rewards_timeout_default_changed(tmp_path):
    """A stage recorded when rewards' timeout_s defaulted to 0 (and isolate false) is the same stage now that it is
    300 s: how a reward runs is not what the stage made. A changed reward weight still is."""
    from align.rerun import RECORD, plan_reruns, stage_dir, write_record

    run_dir, stages, _, _ = load_recipe("quickstart", [f"run_dir={tmp_path / 'run'}"])
    stage = next(s for s in stages if s.kind == "grpo")
    stage.output.mkdir(parents=True)
    (stage.output / "config.json").write_text("{}")  # finished
    write_record(stage, run_dir, [])
    path = stage_dir(stage) / RECORD
    record = json.loads(path.read_text())
    for reward in record["settings"]["rewards"]:
        assert reward["timeout_s"] == 300.0
        reward.update(timeout_s=0.0, isolate=True)  # as an older align recorded it
    path.write_text(json.dumps(record))
    assert plan_reruns(run_dir, [stage]).rerun == []
    record["settings"]["rewards"][0]["weight"] = 123.0
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=rf"stage '{stage.name}' finished with other settings \(rewards: "):
        plan_reruns(run_dir, [stage])
