"""Routed-experts kernels of transformers' DeepSeek-V2 on this device: forward+backward and generation speed.

    python benchmarks/experts_impl.py [--repeats 5] [--batch 8] [--seq 256]

Builds the tiny preset (random weights) and, for each `set_experts_implementation` choice, times a forward+backward
of batch x seq tokens and a sampled `generate` of 16 x 64 tokens; prints medians over repeats (timings on a shared
2-core machine swing a lot: read the medians). align's `experts_impl=auto` picks eager on CPU, grouped_mm on GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DeepseekV2ForCausalLM

from align.model.presets import preset_config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(preset_config(args.preset)).to(device, dtype)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), device=device)
    prompt = torch.randint(3, model.config.vocab_size, (16, 8), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), preset {args.preset}, {dtype}")
    print(f"{'kernel':12}{'fwd+bwd s':>12}{'gen tok/s':>12}")
    for impl in ("eager", "grouped_mm", "batched_mm"):
        try:
            model.set_experts_implementation(impl)
        except Exception as e:  # a kernel this build lacks
            print(f"{impl:12} unavailable: {e}")
            continue
        fb, gen = [], []
        for r in range(args.repeats + 1):
            model.zero_grad(set_to_none=True)
            sync(); t = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            sync(); fb.append(time.perf_counter() - t)
            with torch.no_grad():
                sync(); t = time.perf_counter()
                out = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=True, pad_token_id=0)
                sync(); gen.append((out.shape[0] * (out.shape[1] - prompt.shape[1])) / (time.perf_counter() - t))
        print(f"{impl:12}{statistics.median(fb[1:]):>12.3f}{statistics.median(gen[1:]):>12.0f}")


if __name__ == "__main__":
    main()
