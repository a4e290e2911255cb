"""Mixed precision: full fine-tuning in bf16 keeps fp32 master weights, so a step at the paper's lr moves every
trainable tensor the way the fp32 run does (align/model/precision.py); LoRA keeps fp32 adapters on a bf16 base."""

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from align.run.checkpoint import checkpoint_path
from align.config import load_config
from align.model.precision import Precision, training_precision
from align.sft import SFTConfig, train_sft

from .conftest import DATA
from .test_grpo_loop import _cfg as grpo_cfg
from .test_grpo_loop import _run, _traj


def _weights(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _relative_update_differences(before, after, reference_after) -> list[float]:
    """‖Δ − Δ_fp32‖ / ‖Δ_fp32‖ per tensor that the fp32 run moved."""
    out = []
    for k, w in before.items():
        ref = reference_after[k].float() - w.float()
        if ref.norm() > 0:
            out.append(float(((after[k].float() - w.float()) - ref).norm() / ref.norm()))
    return out


def test_precision_table():
    assert training_precision(torch.bfloat16, lora=False) == Precision(torch.float32, torch.bfloat16)
    assert training_precision(torch.float16, lora=False).mixed
    assert training_precision(torch.bfloat16, lora=True) == Precision(torch.bfloat16, torch.bfloat16)
    assert not training_precision(torch.float32, lora=False).mixed
    assert Precision(torch.float32, torch.bfloat16).accelerator_kwargs() == {"mixed_precision": "bf16"}
    assert Precision(torch.bfloat16, torch.bfloat16).accelerator_kwargs() == {}  # accelerate launch's settings


def test_fsdp2_reduces_gradients_in_fp32(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    plugin = Precision(torch.float32, torch.bfloat16).accelerator_kwargs()["fsdp_plugin"]
    plugin.set_mixed_precision("bf16")
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def _sft(tiny_dir, out, dtype):
    cfg = load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"output_dir={out}", f"model.dtype={dtype}",
                                        f"train_data=[{DATA}/arith/train.jsonl]", "lr=1e-6", "max_steps=1",
                                        "batch_size=8", "warmup_ratio=0", "eval_every=0", "save_every=1",
                                        "tensorboard=false"])
    train_sft(cfg)
    return _weights(checkpoint_path(out, 1))


def test_bf16_sft_step_at_1e6_moves_every_tensor_like_fp32(tiny_dir, tmp_path):
    before = _weights(tiny_dir)
    fp32 = _sft(tiny_dir, tmp_path / "fp32", "float32")
    bf16 = _sft(tiny_dir, tmp_path / "bf16", "bfloat16")
    assert {v.dtype for v in bf16.values()} == {torch.float32}  # the checkpoint holds the fp32 masters
    moved = [k for k in before if not torch.equal(fp32[k], before[k])]
    assert len(moved) > 0.8 * len(before)
    assert all(not torch.equal(bf16[k], before[k]) for k in moved)  # every tensor fp32 moves, bf16 moves
    rel = _relative_update_differences(before, bf16, fp32)
    # Adam's first step is ~lr·sign(g): the bf16 update differs only where bf16 flips a small gradient's sign
    assert statistics.median(rel) < 0.2 and max(rel) < 0.5, (statistics.median(rel), max(rel))
    # the exported model is in the compute dtype, as the user's bf16 checkpoint was
    final = tmp_path / "bf16" / "final"
    assert {v.dtype for v in _weights(final).values()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"


def _grpo_update(tiny_dir, mixed: bool) -> dict[str, torch.Tensor]:
    """One GRPO update at lr 1e-6 on a fixed trajectory, under the Accelerator a run of that precision gets."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from align.grpo.loop import _update
    from align.grpo.trajectory import PolicyForward
    from align.run.optim import build_optimizer
    from align.model.policy import ModelConfig, load_policy

    torch.manual_seed(0)
    precision = Precision(torch.float32, torch.bfloat16 if mixed else torch.float32)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True, **precision.accelerator_kwargs())
    model = load_policy(ModelConfig(path=str(tiny_dir)), dtype=precision.weights)
    opt = build_optimizer(model, 1e-6, 0.0)
    model, opt = accelerator.prepare(model, opt)
    cfg = grpo_cfg(tiny_dir, "unused", "beta=0.04", "micro_batch_size=8", "group_size=4", "lr=1e-6")
    ids = torch.randint(3, 1000, (8, 16), generator=torch.Generator().manual_seed(1))
    traj = _traj(ids, torch.ones(8, 8), torch.tensor([1.0, -1.0, 0.5, -0.5] * 2), G=4,
                 ref_logprobs=torch.zeros(8, 8) - 7.0)
    run = _run(model, cfg, opt, accelerator)
    _update(run, traj, cfg, PolicyForward.of(cfg), torch.Generator().manual_seed(0), 1)
    AcceleratorState._reset_state(reset_partial_state=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bf16_grpo_update_at_1e6_moves_every_tensor_like_fp32(tiny_dir):
    from align.model.policy import ModelConfig, load_policy

    before = {k: v.detach().clone() for k, v in load_policy(ModelConfig(path=str(tiny_dir))).state_dict().items()}
    fp32, bf16 = _grpo_update(tiny_dir, mixed=False), _grpo_update(tiny_dir, mixed=True)
    assert {v.dtype for v in bf16.values()} == {torch.float32}
    moved = [k for k in before if not torch.equal(fp32[k], before[k])]
    assert len(moved) > 0.8 * len(before)
    assert all(not torch.equal(bf16[k], before[k]) for k in moved)
    rel = _relative_update_differences(before, bf16, fp32)
    assert statistics.median(rel) < 0.2 and max(rel) < 0.6, (statistics.median(rel), max(rel))


def test_lora_on_bf16_base_keeps_fp32_adapters(tiny_dir):
    from align.model.policy import ModelConfig, LoRAConfig, load_policy

    cfg = ModelConfig(path=str(tiny_dir), dtype="bfloat16", lora=LoRAConfig(enabled=True))
    model = load_policy(cfg)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and "base_layer" in n}
    assert trainable == {torch.float32} and set(frozen.values()) == {torch.bfloat16}, frozen
    assert not training_precision(torch.bfloat16, lora=True).mixed  # no autocast: peft casts at each adapter


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_bf16_grpo_run_checkpoints_fp32_masters_and_exports_bf16(tiny_dir, tmp_path, dtype):
    from align.grpo.loop import train_grpo

    out = tmp_path / "g"
    train_grpo(grpo_cfg(tiny_dir, out, "steps=1", f"model.dtype={dtype}", "lr=1e-6", "routing_metrics_every=0"))
    before, after = _weights(tiny_dir), _weights(checkpoint_path(out, 1))
    assert {v.dtype for v in after.values()} == {torch.float32}
    changed = sum(int((after[k] != before[k]).sum()) for k in before) / sum(v.numel() for v in before.values())
    assert changed > 0.5  # bf16 stepped in place kept ~1.7% (benchmarks/bf16_updates.py)
    assert {v.dtype for v in _weights(out / "final").values()} == {torch.bfloat16}
