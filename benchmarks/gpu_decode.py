"""Where does transformers-engine decoding spend its time at DeepSeek-V2-Lite's widths? (HFEngine.generate)

    python benchmarks/gpu_decode.py [--preset deepseek-v2-lite] [--rows 256] [--new-tokens 64] [--json OUT]

Builds the preset with random weights on the GPU in bf16 and times `HFEngine.generate` of --rows completions of
exactly --new-tokens tokens (EOS suppressed), at --rows and at a quarter of it, in three settings: align's decode
paths on (absorbed MLA, reserved cache and shared prefill, the experts kernel kept: `moe.decode_experts_kernel`);
the same with transformers' decode-time switch of grouped_mm to batched_mm left in place; every path off
(transformers' own attention, cache and switch). Then profiles a short generate with the paths on and prints the
operators that take the most GPU and CPU time. Seconds per decode step =
generate time / new tokens (prefill included: it is one step of many).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--profile-tokens", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()

    from gpu_lite import build

    from align.model import fastpaths
    from align.model.moe import measure_experts_impl
    from align.model.tokenizer import train_tokenizer
    from align.rollout.hf import HFEngine
    from align.rollout.protocol import SamplingConfig
    from align.tiny import corpus_texts

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build(args.preset, device, torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = True
    print("experts kernel:", measure_experts_impl(model, tokens=4096 if cuda else 256), flush=True)
    tok = train_tokenizer(corpus_texts())
    model.generation_config.suppress_tokens = [tok.eos_token_id]
    engine = HFEngine(model, tok)
    rows = [json.loads(x) for x in (ROOT / "data" / "arith" / "rl_prompts.jsonl").read_text().splitlines()]
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu"}

    import contextlib

    import align.rollout.hf as hf

    def run(n_rows: int, new_tokens: int, paths_on: bool, keep_kernel: bool = True) -> float:
        prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows[:max(1, n_rows // 16)]]
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens, batch_size=n_rows)
        real = fastpaths.active
        kernel = hf.decode_experts_kernel if paths_on and keep_kernel else (lambda m, r: contextlib.nullcontext())
        with mock.patch.object(fastpaths, "active", real if paths_on else (lambda name: False)), \
                mock.patch.object(hf, "decode_experts_kernel", kernel):
            sync()
            t = time.perf_counter()
            engine.generate(prompts, n=16, sampling=sampling)
            sync()
        return time.perf_counter() - t

    run(16, 4, True)  # warm-up: kernels, the fast paths' checks
    for n_rows in (args.rows, args.rows // 4):
        for on, keep, what in ((True, True, "align's decode paths on"),
                               (True, False, "paths on, transformers' batched_mm decode switch"),
                               (False, False, "every path off")):
            s = run(n_rows, args.new_tokens, on, keep)
            key = f"rows{n_rows}_" + ("on" if keep else "switch" if on else "off")
            res[key] = {"s": s, "s_per_step": s / args.new_tokens, "tokens_s": n_rows * args.new_tokens / s}
            print(f"{n_rows} rows x {args.new_tokens} tokens, {what}: "
                  f"{s:.1f} s, {s / args.new_tokens * 1e3:.0f} ms per step, {n_rows * args.new_tokens / s:,.0f} tok/s",
                  flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1))
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        run(args.rows, args.profile_tokens, True)
    table_gpu = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table_gpu, flush=True)
    print(table_cpu, flush=True)
    if args.json:
        Path(args.json).with_suffix(".profile.txt").write_text(table_gpu + "\n\n" + table_cpu)


if __name__ == "__main__":
    main()
