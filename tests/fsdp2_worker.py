"""Run under torchrun (gloo) by tests/test_multiprocess.py: the policy sharded with FSDP2 `fully_shard` (per decoder
layer + root, as accelerate's FSDP2 config does) against the same policy unsharded: chunked log-probs, their
gradients, and the weights a vLLM sync would send (LoRA merged). Variant `mixed`: fp32 master weights sharded under
the MixedPrecisionPolicy align.model.precision asks for (bf16 compute, fp32 gradient reduction) against the unsharded
fp32 policy under bf16 autocast."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from align.model.logprobs import forward_logprobs
from align.model.policy import LoRAConfig, ModelConfig, causal_lm, load_policy
from align.rollout.weights import merged_state_dict

model_dir, out, lora, mixed = sys.argv[1], sys.argv[2], sys.argv[3] == "lora", sys.argv[3] == "mixed"
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
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else \
    MixedPrecisionPolicy()
for layer in causal_lm(sharded).model.layers:
    fully_shard(layer, mp_policy=policy)
fully_shard(sharded, mp_policy=policy)
ids = torch.randint(3, 1000, (3, 14))                                     # the same batch on every process
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
    a = forward_logprobs(plain, ids, 6, chunk_tokens=5).logprobs
b = forward_logprobs(sharded, ids, 6, chunk_tokens=5).logprobs
a.sum().backward()
b.sum().backward()                                                        # gradients averaged over processes
grads = {n: (p.grad, dict(sharded.named_parameters())[n].grad) for n, p in plain.named_parameters()
         if p.requires_grad}
grad_gap = max((g.full_tensor() - r).abs().max().item() for r, g in grads.values())
grad_rel_gap = max(((g.full_tensor() - r).norm() / r.norm().clamp_min(1e-12)).item() for r, g in grads.values())
full, gathered = merged_state_dict(plain), merged_state_dict(sharded)
weight_gap = max((full[k] - gathered[k]).abs().max().item() for k in full)
if dist.get_rank() == 0:
    json.dump({"logprob_gap": (a - b).abs().max().item(), "grad_gap": grad_gap, "weight_gap": weight_gap,
               "same_names": sorted(full) == sorted(gathered), "n_grads": len(grads),
               "grad_dtypes": sorted({str(g.dtype) for _, g in grads.values()}), "grad_rel_gap": grad_rel_gap},
              open(out, "w"))
dist.destroy_process_group()
