"""rollout.engine=vllm_server on this CPU: server start time, weight push speed, the parity table, and GRPO step time
through the server against the colocated vLLM engine, side by side in one run (run it in the vLLM venv of .ci/run).

    python benchmarks/server_rollouts.py [--steps 4] [--wire-mb 256]

1. The wire alone: `send_weights` / `receive_weights` between two processes over gloo (no vLLM), --wire-mb of fp32
   tensors in 512 MiB buckets: seconds and MB/s.
2. Per server (TP=1, then TP=2): the time to healthy, then on the tiny DeepSeek-V2 (fp32, ~8 MB of weights) max |Δ
   log-prob| on the engine's probe before a push (the policy moved), after a push by gloo and by disk, and after a
   push that skips the CPU expert re-prepack (the negative control), with each push's seconds.
3. GRPO: the same run (G=4, 2 prompts per step, 24 new tokens, temperature 1) with rollout.engine=vllm, with
   vllm_server (TP=1, launched by the run), and with vllm_server one step ahead (rollout.max_off_policy_steps=1):
   mean perf/step_s, generate_s (ahead: the wait for the batch), sync_s, overlap_s over steps 2.. (step 1 warms
   up). `--only-grpo` runs just this part.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WIRE_PEER = """
import sys, torch
from align.rollout.server_worker import receive_weights, weight_group
_, g = weight_group("127.0.0.1", int(sys.argv[1]), 1, 2, "gloo", 120)
counts = {"tensors": 0, "bytes": 0}
for _ in receive_weights(g, torch.device("cpu"), counts):
    pass
print(counts["bytes"])
"""


def wire(mb: int) -> dict:
    from align.rollout.server_worker import send_weights, weight_group

    port = _port()
    peer = subprocess.Popen([sys.executable, "-c", WIRE_PEER, str(port)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, group = weight_group("127.0.0.1", port, 0, 2, "gloo", 120)
    weights = [(f"w{i}", torch.randn(1 << 20)) for i in range(mb // 4)]  # 4 MB each
    t = time.perf_counter()
    send_weights(group, iter(weights), 512 << 20, torch.device("cpu"))
    received = int(peer.communicate(timeout=300)[0].strip())
    s = time.perf_counter() - t
    return {"mb": received / 2**20, "s": s, "mb_per_s": received / 2**20 / s}


def parity(tiny: Path, tp: int, work: Path) -> dict:
    from align.model.policy import ModelConfig, load_policy, load_tokenizer
    from align.rollout.engines import EngineContext
    from align.rollout.protocol import RolloutConfig, ServerConfig
    from align.rollout.vllm_server import (LaunchedServer, VLLMServerEngine, iter_checkpoint_weights,
                                           iter_merged_weights, server_command)

    port = _port()
    cmd, env = server_command(str(tiny), dtype=torch.float32, max_model_len=512, port=port, tensor_parallel_size=tp,
                              on_cpu=True, attention_backend="CPU_MLA")
    server = LaunchedServer(cmd, env, work / f"server-tp{tp}.log", f"http://127.0.0.1:{port}", 1800)
    out = {"tp": tp, "start_s": server.start_s}
    tok = load_tokenizer(tiny)
    try:
        for transport in ("gloo", "disk"):
            model = load_policy(ModelConfig(path=str(tiny)))
            ctx = EngineContext(model=model, model_path=str(tiny), tokenizer=tok, dtype=torch.float32,
                                device=torch.device("cpu"), seed=0, max_model_len=512, output_dir=str(work))
            eng = VLLMServerEngine.start(RolloutConfig(engine="vllm_server", server=ServerConfig(
                url=server.url, transport=transport)), ctx)
            torch.manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.2)

            def gap():
                mine, _ = eng._trainer_probe(model)
                return (mine - eng._server_probe()).abs().max().item()
            out[f"before_{transport}"] = gap()
            t = time.perf_counter()
            eng.version += 1
            eng._push(iter_checkpoint_weights(model, iter_merged_weights(model)), eng.version)
            out[f"push_s_{transport}"] = time.perf_counter() - t
            out[f"after_{transport}"] = gap()
            if transport == "gloo":
                eng.version += 1
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if "experts" in n and "shared" not in n:
                            p.add_(torch.randn_like(p) * 0.2)
                eng._push(iter_checkpoint_weights(model, iter_merged_weights(model)), eng.version,
                          refresh_experts=False)
                out["no_reprepack"] = gap()
            eng.close()
    finally:
        server.stop()
    return out


def grpo(tiny: Path, work: Path, engine: list[str], steps: int) -> dict:
    from align.config import load_config
    from align.grpo.config import GRPOConfig
    from align.grpo.loop import train_grpo
    from align.run.metrics import read_metrics

    out = work / ("-".join(e.split("=")[1] for e in engine if "engine=" in e or "max_off" in e))
    cfg = load_config(GRPOConfig, None, [
        f"model.path={tiny}", f"output_dir={out}", f"train_data=[{ROOT}/data/arith/rl_prompts.jsonl]",
        "rewards=[{name: exact_answer}]", "group_size=4", "prompts_per_step=2", f"steps={steps}",
        "sampling.max_new_tokens=24", "save_every=0", "routing_metrics_every=0", *engine])
    train_grpo(cfg)
    rows = read_metrics(out)[1:]
    keys = [k for k in ("step_s", "generate_s", "sync_s", "overlap_s", "wait_s") if f"perf/{k}" in rows[0]]
    return {k: sum(r[f"perf/{k}"] for r in rows) / len(rows) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--wire-mb", type=int, default=256)
    ap.add_argument("--only-grpo", action="store_true", help="skip the wire and parity parts")
    args = ap.parse_args()
    from align.tiny import build_tiny

    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        tiny = work / "tiny"
        build_tiny(tiny)
        results = {} if args.only_grpo else {"wire": wire(args.wire_mb)}
        for tp in () if args.only_grpo else (1, 2):
            results[f"tp{tp}"] = parity(tiny, tp, work)
            print(f"tp{tp}", json.dumps(results[f"tp{tp}"]), flush=True)
        port = _port()
        results["grpo_colocated"] = grpo(tiny, work, ["rollout.engine=vllm"], args.steps)
        results["grpo_server"] = grpo(tiny, work, ["rollout.engine=vllm_server", "rollout.server.launch=true",
                                                   f"rollout.server.port={port}"], args.steps)
        results["grpo_server_ahead"] = grpo(tiny, work, [
            "rollout.engine=vllm_server", "rollout.server.launch=true", f"rollout.server.port={_port()}",
            "rollout.max_off_policy_steps=1"], args.steps)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min)")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
