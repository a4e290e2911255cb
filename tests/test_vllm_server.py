"""rollout.engine=vllm_server against a real vLLM server on the tiny DeepSeek-V2 (CPU, fp32; skipped where vLLM is
absent). One server per pytest run, started with align's own command line at tensor parallelism 2 (so every test
here is also a TP=2 test: each worker takes the full tensors and shards them itself); the last test kills it.

Tolerances: fp32 on CPU, measured max |Δ log-prob| ~5e-7 after a push; asserted 1e-4. Before a push (the policy
moved, the server not) the gap is > 0.5; skipping the expert re-prepack (the negative control) leaves > 1e-2.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.rollout.protocol import RolloutConfig, SamplingConfig, ServerConfig
from align.rollout.vllm import vllm_missing

from .conftest import DATA

pytestmark = pytest.mark.skipif(vllm_missing() is not None, reason=str(vllm_missing()))

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
PROMPTS = [[{"role": "user", "content": q}] for q in ("What is 12 + 34?", "hello", "What is 90 + 9?")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """The module's one vLLM server (TP=2), started as rollout.server.launch starts one."""
    from align.rollout.vllm_server import LaunchedServer, server_command

    port = _free_port()
    cmd, env = server_command(str(tiny_dir), dtype=torch.float32, max_model_len=512, port=port,
                              tensor_parallel_size=2, on_cpu=True, attention_backend="CPU_MLA")
    launched = LaunchedServer(cmd, env, tmp_path_factory.mktemp("server") / "vllm_server.log",
                              f"http://127.0.0.1:{port}", start_timeout_s=900)
    yield launched
    launched.stop()


def _engine(server, model, tokenizer, tmp_path, **settings):
    from align.rollout.engines import EngineContext
    from align.rollout.vllm_server import VLLMServerEngine

    cfg = RolloutConfig(engine="vllm_server", server=ServerConfig(url=server.url, **settings))
    VLLMServerEngine.check(cfg, "float32", False)
    ctx = EngineContext(model=model, model_path="unused", tokenizer=tokenizer, dtype=torch.float32,
                        device=torch.device("cpu"), seed=0, max_model_len=512, output_dir=str(tmp_path))
    return VLLMServerEngine.start(cfg, ctx)


def _policy(tiny_dir, lora=False):
    from align.model.policy import LoRAConfig, ModelConfig, load_policy

    return load_policy(ModelConfig(path=str(tiny_dir), lora=LoRAConfig(enabled=lora, experts=lora)))


def _move(model, scale=0.2, only=None):
    """Move every trainable weight (or those whose name contains `only`) far enough to change log-probs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and (only is None or (only in n and "shared" not in n)):
                p.add_(torch.randn_like(p) * scale)


def _gap(engine, model) -> float:
    """max |Δ log-prob| between the server and the trainer on the engine's probe, as the gate measures it."""
    mine, _ = engine._trainer_probe(model)
    return (mine - engine._server_probe()).abs().max().item()


@pytest.mark.parametrize("transport", ["gloo", "disk"])
def test_a_push_makes_the_server_agree_with_the_trainer(server, tiny_dir, tokenizer, tmp_path, transport):
    model = _policy(tiny_dir)
    eng = _engine(server, model, tokenizer, tmp_path, transport=transport, bucket_mb=1)
    assert eng.sync_metrics["rollout/sync_max_abs_diff"] < TOL     # the start's push and gate
    _move(model)
    assert _gap(eng, model) > 0.5                                  # the server still has the old weights
    eng.sync_weights(model)
    assert eng.sync_metrics["rollout/sync_max_abs_diff"] < TOL and eng.version == 1
    if transport == "disk":                                        # each push's folder removed once loaded
        assert list((tmp_path / "server_weights").iterdir()) == []
    eng.close()


def test_lora_is_merged_on_the_way(server, tiny_dir, tokenizer, tmp_path):
    model = _policy(tiny_dir, lora=True)
    eng = _engine(server, model, tokenizer, tmp_path)
    _move(model, only="lora_B")
    assert _gap(eng, model) > 1e-2
    eng.sync_weights(model)
    assert eng.sync_metrics["rollout/sync_max_abs_diff"] < TOL
    eng.close()


def test_a_push_without_the_expert_reprepack_is_caught_and_the_moe_layer_named(server, tiny_dir, tokenizer,
                                                                                 tmp_path):
    from align.rollout.vllm_server import ServerError, iter_checkpoint_weights, iter_merged_weights

    model = _policy(tiny_dir)
    eng = _engine(server, model, tokenizer, tmp_path)
    _move(model, only="experts")
    eng.version += 1
    eng._push(iter_checkpoint_weights(model, iter_merged_weights(model)), eng.version, refresh_experts=False)
    assert _gap(eng, model) > 1e-2
    with pytest.raises(ServerError, match=r"check_tol.*First difference: model\.layers\.\d+\.mlp \(DeepseekV2MoE"):
        eng._gate(model)
    eng.sync_weights(model)                                        # a full push repairs it
    assert eng.sync_metrics["rollout/sync_max_abs_diff"] < TOL
    eng.close()


def test_server_rollouts_equal_the_colocated_engine(server, tiny_dir, tokenizer, tmp_path):
    """Same weights, greedy: the same completions, token for token, and the same sampling log-probs."""
    from align.rollout.vllm import VLLMEngine

    model = _policy(tiny_dir)
    _move(model, scale=0.05)
    eng = _engine(server, model, tokenizer, tmp_path)
    colocated = VLLMEngine(str(tiny_dir), tokenizer, RolloutConfig(engine="vllm"), dtype=torch.float32,
                           device="cpu", seed=0, max_model_len=512)
    colocated.sync_weights(model)
    sampling = SamplingConfig(temperature=0, max_new_tokens=12)
    a, b = eng.generate(PROMPTS, n=2, sampling=sampling), colocated.generate(PROMPTS, n=2, sampling=sampling)
    assert a.completions == b.completions and torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.truncated, b.truncated)
    assert (a.sampling_logprobs - b.sampling_logprobs).abs().max() < 1e-5
    sampled = eng.generate(PROMPTS, n=3, sampling=SamplingConfig(temperature=1.0, max_new_tokens=8))
    assert sampled.prompt_ids.shape[0] == 9 and len(set(sampled.completions[:3])) > 1  # per-request seeds
    eng.close()


def test_tool_rollouts_through_the_server_equal_transformers(server, tiny_dir, tokenizer, tmp_path, monkeypatch):
    """Multi-turn rollouts continue each sample by token ids through the server's completions API too."""
    from align.rollout.hf import HFEngine

    from .test_multiturn import tool_rollouts_on_both

    model = _policy(tiny_dir)
    eng = _engine(server, model, tokenizer, tmp_path)
    tool_rollouts_on_both(eng, HFEngine(model, tokenizer), tokenizer, monkeypatch)
    eng.close()


def index_reward(prompts, completions, **columns):
    return [float(i % 3) for i in range(len(completions))]


def _grpo(tiny_dir, out: Path, engine_settings: list[str]) -> list[dict]:
    from align.config import load_config
    from align.grpo.config import GRPOConfig
    from align.grpo.loop import train_grpo
    from align.run.metrics import read_metrics

    cfg = load_config(GRPOConfig, None, [
        f"model.path={tiny_dir}", f"output_dir={out}", f"train_data=[{DATA}/arith/rl_prompts.jsonl]",
        "rewards=[{name: 'tests.test_vllm_server:index_reward', weight: 1.0}]", "group_size=3",
        "prompts_per_step=2", "steps=2", "sampling.temperature=0", "sampling.max_new_tokens=8", "lr=1e-2",
        "save_every=0", "balance_alpha=0.01", "tis_cap=0", *engine_settings])
    train_grpo(cfg)
    return read_metrics(out)


def test_two_greedy_grpo_steps_through_the_server_equal_the_colocated_engine(server, tiny_dir, tmp_path):
    """Greedy groups are G equal completions, so the policy gradient is zero by construction: the update moves the
    router through the balance loss (balance_alpha) and step 2's KL then differs from 0. tis_cap=0 keeps the
    engines' ~1e-7 log-prob differences out of the loss (Adam would magnify them in a near-zero gradient)."""
    colocated = _grpo(tiny_dir, tmp_path / "colocated", ["rollout.engine=vllm"])
    served = _grpo(tiny_dir, tmp_path / "served", ["rollout.engine=vllm_server", f"rollout.server.url={server.url}"])
    assert [m["step"] for m in served] == [1, 2]
    for a, b in zip(colocated, served):
        assert b["rollout/sync_max_abs_diff"] < TOL
        keys = {k for k in a if not k.startswith("perf/") and isinstance(a[k], float)} - {"time"}
        far = {k: (a[k], b[k]) for k in keys if not (math.isnan(a[k]) and math.isnan(b[k]))
               and not abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k]))}
        assert keys and not far, far
    assert served[1]["loss/kl"] > 1e-4  # step 1 moved the policy: step 2 sampled from pushed weights


def test_fsdp2_two_processes_push_to_the_server(server, tiny_dir, tmp_path):
    """Two training processes (FSDP2, gloo): shards gathered, rank 0 pushes, the gate agrees on every process."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), str(ROOT / "tests" / "server_fsdp2_worker.py"), str(tiny_dir),
                          server.url, str(out)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["before"] > 0.5 and r["after"] < TOL and r["rank1_after"] == r["after"]


def test_rollouts_one_step_ahead_overlap_training_stay_within_the_lag_and_survive_a_kill(server, tiny_dir,
                                                                                           tmp_path):
    """rollout.max_off_policy_steps=1: step k+1 is sampled while step k trains (perf/overlap_s > 0), from a policy
    at most one version old; a run killed in step 2's update resumes and finishes (batches in flight regenerated)."""
    from align.run.metrics import read_metrics

    args = [f"model.path={tiny_dir}", f"train_data=[{DATA}/arith/rl_prompts.jsonl]",
            "rewards=[{name: 'tests.test_grpo_loop:char_count', weight: 1.0}]", "group_size=3",
            "prompts_per_step=2", "steps=4", "sampling.max_new_tokens=8", "lr=1e-2", "save_every=1",
            "rollout.engine=vllm_server", f"rollout.server.url={server.url}", "rollout.max_off_policy_steps=1"]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}

    def grpo(out, fault=None):
        return subprocess.run([sys.executable, "-m", "align", "grpo", f"output_dir={out}", *args], cwd=ROOT,
                              env={**env, **({"ALIGN_FAULT": fault} if fault else {})}, capture_output=True,
                              text=True, timeout=600)
    whole = grpo(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    rows = read_metrics(tmp_path / "whole")
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert [m["rollout/staleness"] for m in rows] == [0.0, 1.0, 1.0, 1.0]   # step 1 waits for nothing older
    assert all(m["rollout/stale_dropped"] == 0 and m["rollout/sync_max_abs_diff"] < TOL for m in rows)
    assert all(m["perf/overlap_s"] > 0 for m in rows[1:])                   # sampled during the previous update
    killed = grpo(tmp_path / "killed", fault="update:2")
    assert killed.returncode != 0
    resumed = grpo(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4]
    assert (tmp_path / "killed" / "final" / "config.json").exists()


def test_zz_the_server_killed_mid_push_stops_the_trainer_within_the_timeout(server, tiny_dir, tokenizer, tmp_path,
                                                                             monkeypatch):
    """Last in the module: it kills the module's server."""
    import align.rollout.vllm_server as vs

    model = _policy(tiny_dir)
    eng = _engine(server, model, tokenizer, tmp_path, bucket_mb=1, timeout_s=20)
    send = vs.send_weights

    def killing(group, weights, bucket_bytes, device):
        def stream():
            for i, item in enumerate(weights):
                if i == 10:
                    os.killpg(server.proc.pid, signal.SIGKILL)
                    time.sleep(1)
                yield item
        return send(group, stream(), bucket_bytes, device)
    monkeypatch.setattr(vs, "send_weights", killing)
    t = time.monotonic()
    with pytest.raises(vs.ServerError, match=rf"{server.url}.*weight push for step 1"):
        eng.sync_weights(model)
    assert time.monotonic() - t < 20 + 10
