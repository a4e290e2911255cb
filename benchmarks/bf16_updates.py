"""Do bf16 runs keep their updates? One SFT step and one GRPO step at the paper's learning rates (SFT 5e-6 here
1e-6 for both, the smallest step either stage takes) on the tiny model, in fp32, in bf16 as align trains it (fp32
master weights, bf16 compute) and in bf16 stepped in place (bf16 weights and AdamW state: what align did before).

    python benchmarks/bf16_updates.py [--lr 1e-6] [--model DIR]

Per run and stage it prints the share of trainable tensors whose update Δ = W_after − W_before is non-zero, the share
of parameters changed, and the median over tensors of the relative difference ‖Δ − Δ_fp32‖ / ‖Δ_fp32‖ to the fp32
run's update. W_after is read from the step-1 training checkpoint (the weights the optimizer holds); W_before is
the model as each run loaded it (rounded to bf16 for the in-place run). GRPO's samples differ between dtypes (the
logits differ), so its relative difference includes different completions; tests/test_precision.py compares the
GRPO update on one fixed trajectory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = {"fp32": "float32", "bf16 (fp32 master)": "bfloat16", "bf16 in place (before)": "bfloat16"}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(f).items()})
    return out


def run_stage(stage: str, model: Path, out: Path, dtype: str, in_place: bool, lr: float) -> dict[str, torch.Tensor]:
    """Train one step; the step-1 checkpoint's weights."""
    from align.run import trainer
    from align.config import load_config
    from align.model.precision import Precision

    data = ROOT / "data" / "arith"
    common = [f"model.path={model}", f"output_dir={out}", f"model.dtype={dtype}", f"lr={lr}", "save_every=1",
              "keep_last=0", "tensorboard=false", "seed=0"]
    if stage == "sft":
        from align.sft import SFTConfig, train_sft

        cfg = load_config(SFTConfig, None, [*common, f"train_data=[{data}/train.jsonl]", "max_steps=1",
                                            "batch_size=8", "warmup_ratio=0", "eval_every=0"])
        train = train_sft
    else:
        from align.grpo.config import GRPOConfig
        from align.grpo.loop import train_grpo

        cfg = load_config(GRPOConfig, None, [*common, f"train_data=[{data}/rl_prompts.jsonl]", "steps=1",
                                             "rewards=[{name: 'benchmarks.bf16_updates:length', weight: 1.0}]",
                                             "group_size=4", "prompts_per_step=2", "sampling.max_new_tokens=8",
                                             "routing_metrics_every=0"])
        train = train_grpo
    if in_place:  # the old behaviour: weights, gradients and AdamW state all bf16
        keep = Precision(torch.bfloat16, torch.bfloat16)
        with mock.patch.object(trainer, "training_precision", lambda compute, lora: keep):
            train(cfg)
    else:
        train(cfg)
    from align.run.checkpoint import checkpoint_path

    return _weights(checkpoint_path(out, 1))


def length(prompts, completions, **_):
    """A reward with spread even for a random-weight model."""
    return [float(len(c)) for c in completions]


def compare(before: dict, after: dict, reference: dict | None) -> dict:
    names = [k for k in before if k in after]
    deltas = {k: after[k] - before[k] for k in names}
    changed = [k for k in names if deltas[k].abs().max() > 0]
    n_changed = sum(int((deltas[k] != 0).sum()) for k in names)
    out = {"tensors changed": f"{len(changed)}/{len(names)}",
           "params changed": f"{100 * n_changed / sum(before[k].numel() for k in names):.2f}%"}
    if reference is not None:
        rel = [float((deltas[k] - reference[k]).norm() / reference[k].norm()) for k in names
               if reference[k].norm() > 0]
        out["rel. update diff (median / max)"] = f"{statistics.median(rel):.3f} / {max(rel):.3f}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--model", help="a model directory (default: a fresh tiny model)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tmp / "tiny"
        if not args.model:
            from align.tiny import build_tiny

            build_tiny(model)
        before = _weights(model)
        for stage in ("sft", "grpo"):
            deltas_fp32 = None
            rows = []
            for i, (label, dtype) in enumerate(MODES.items()):
                in_place = "before" in label
                after = run_stage(stage, model, tmp / f"{stage}-{i}", dtype, in_place, args.lr)
                start = {k: v.bfloat16().float() for k, v in before.items()} if in_place else before  # as loaded
                result = compare(start, after, deltas_fp32)
                if deltas_fp32 is None:
                    deltas_fp32 = {k: after[k] - before[k] for k in before if k in after}
                rows.append((label, result))
            print(f"\n{stage} step at lr {args.lr:g} (tiny model, {sum(v.numel() for v in before.values()):,} params)")
            for label, result in rows:
                print(f"  {label:24s} " + "  ".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
