"""Run under torchrun (gloo) by tests/test_multiprocess.py: the policy sharded with FSDP2 `fully_shard` (per decoder
layer + root, as accelerate's FSDP2 config does) against the same policy unsharded: chunked log-probs, their
gradients, and the weights a vLLM sync would send (LoRA merged)."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from align.logprobs import forward_logprobs
from align.policy import LoRAConfig, ModelConfig, causal_lm, load_policy
from align.rollout.weights import merged_state_dict

model_dir, out, lora = sys.argv[1], sys.argv[2], sys.argv[3] == "lora"
dist.init_process_group("gloo")
cfg = ModelConfig(path=model_dir, lora=LoRAConfig(enabled=lora, experts=lora))
torch.manual_seed(0)
plain = load_policy(cfg)
with torch.no_grad():
    for n, p in plain.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.1)
sharded = load_policy(cfg)
sharded.load_state_dict(plain.state_dict())
for layer in causal_lm(sharded).model.layers:
    fully_shard(layer)
fully_shard(sharded)
ids = torch.randint(3, 1000, (3, 14))                                     # the same batch on every process
a = forward_logprobs(plain, ids, 6, chunk_tokens=5).logprobs
b = forward_logprobs(sharded, ids, 6, chunk_tokens=5).logprobs
a.sum().backward()
b.sum().backward()                                                        # gradients averaged over processes
grads = {n: (p.grad, dict(sharded.named_parameters())[n].grad) for n, p in plain.named_parameters()
         if p.requires_grad}
grad_gap = max((g.full_tensor() - r).abs().max().item() for r, g in grads.values())
full, gathered = merged_state_dict(plain), merged_state_dict(sharded)
weight_gap = max((full[k] - gathered[k]).abs().max().item() for k in full)
if dist.get_rank() == 0:
    json.dump({"logprob_gap": (a - b).abs().max().item(), "grad_gap": grad_gap, "weight_gap": weight_gap,
               "same_names": sorted(full) == sorted(gathered), "n_grads": len(grads)}, open(out, "w"))
dist.destroy_process_group()
