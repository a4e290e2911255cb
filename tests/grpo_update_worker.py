"""Run under torchrun by tests/test_multiprocess.py: one GRPO update (`align.grpo.loop._update`) on this process's
share of a fixed batch, with plain SGD so the parameters after the step are p - lr * (global gradient)."""

import json
import sys

import torch
from accelerate import Accelerator

from align.config import load_config
from align.grpo.config import GRPOConfig
from align.grpo.loop import _update
from align.grpo.trajectory import PolicyForward, Trajectory
from align.model.policy import ModelConfig, load_policy
from align.run.trainer import Run

model_dir, out, aggregation = sys.argv[1], sys.argv[2], sys.argv[3]
acc = Accelerator(cpu=True)
world, rank = acc.num_processes, acc.process_index
cfg = load_config(GRPOConfig, None, [f"model.path={model_dir}", "output_dir=unused", "train_data=[x]",
                                     "rewards=[{name: exact_answer}]", "micro_batch_size=3", "beta=0.04",
                                     "group_size=2", f"aggregation={aggregation}", "balance_alpha=0"])
torch.manual_seed(0)
N, P, C = 8, 5, 6
ids = torch.randint(3, 1000, (N, P + C))
mask = torch.ones(N, P + C, dtype=torch.long)
loss_mask = (torch.rand(N, C) > 0.3).long()                       # completions of different lengths
advantages = torch.randn(N)
traj = Trajectory(input_ids=ids, attention_mask=mask, loss_mask=loss_mask, group=torch.arange(N) // 2,
                  rewards={}, total=advantages, advantages=advantages, sampling_logprobs=torch.full((N, C), -7.0),
                  ref_logprobs=torch.full((N, C), -6.9))
traj = traj[torch.arange(rank * N // world, (rank + 1) * N // world)]
model = load_policy(ModelConfig(path=model_dir))
opt = torch.optim.SGD(model.parameters(), lr=1.0)
model, opt = acc.prepare(model, opt)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
run = Run("grpo", cfg, acc, model, opt, sched, None, None, 0, {}, False)
stats = _update(run, traj, cfg, PolicyForward.of(cfg), torch.Generator().manual_seed(0), 1)
if acc.is_main_process:
    params = {n: p.detach().double().sum().item() for n, p in acc.unwrap_model(model).named_parameters()}
    json.dump({"grad_norm": stats["train/grad_norm"], "params": params}, open(out, "w"))
