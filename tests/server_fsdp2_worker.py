"""Run under torchrun (gloo, 2 processes) by tests/test_vllm_server.py: the policy sharded with FSDP2 pushes its
weights to a vLLM server through rollout.engine=vllm_server; the parity gate's result on every process."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from align.model.policy import ModelConfig, causal_lm, load_policy, load_tokenizer
from align.rollout.engines import EngineContext
from align.rollout.protocol import RolloutConfig, ServerConfig
from align.rollout.vllm_server import VLLMServerEngine

model_dir, url, out = sys.argv[1:4]
dist.init_process_group("gloo")
model = load_policy(ModelConfig(path=model_dir))
print({type(p).__name__ for p in model.parameters()}, flush=True)
for layer in causal_lm(model).model.layers:
    fully_shard(layer)
fully_shard(model)
cfg = RolloutConfig(engine="vllm_server", server=ServerConfig(url=url, timeout_s=120))
ctx = EngineContext(model=model, model_path=model_dir, tokenizer=load_tokenizer(model_dir), dtype=torch.float32,
                    device=torch.device("cpu"), seed=dist.get_rank(), max_model_len=512, processes=2)
engine = VLLMServerEngine.start(cfg, ctx)
torch.manual_seed(1)  # the same moves on every process, each applied to its own shard
with torch.no_grad():
    for p in model.parameters():
        if hasattr(p, "full_tensor"):  # a DTensor shard
            full = torch.randn(p.full_tensor().shape) * 0.2
            p.add_(torch.distributed.tensor.distribute_tensor(full, p.device_mesh, p.placements))
        else:
            p.add_(torch.randn(p.shape) * 0.2)
mine, _ = engine._trainer_probe(model)  # every process (FSDP2 gathers); rank 0 asks the server
before = (mine - engine._server_probe()).abs().max().item() if dist.get_rank() == 0 else None
engine.sync_weights(model)
after = engine.sync_metrics["rollout/sync_max_abs_diff"]
gathered = [None, None]
dist.all_gather_object(gathered, after)
if dist.get_rank() == 0:
    json.dump({"before": before, "after": after, "rank1_after": gathered[1]}, open(out, "w"))
engine.close()
dist.destroy_process_group()
