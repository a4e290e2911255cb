"""DeepSeek-V2-Lite on one GPU: SFT throughput and MFU, a LoRA GRPO step's breakdown, generation against the
memory-bandwidth floor, peak memory. Random weights built directly on the GPU (no download, no disk).

    python benchmarks/gpu_lite.py [--preset deepseek-v2-lite] [--prompts 16] [--group 16] [--new-tokens 512]
                                  [--sft-batch 8] [--sft-seq 2048] [--sft-steps 5] [--lora-r 64] [--json OUT]
    python benchmarks/gpu_lite.py --preset tiny --prompts 2 --group 2 --new-tokens 8 --sft-seq 64   # CPU smoke run

What each figure is:
- experts kernel: `align.model.moe.measure_experts_impl` times one MoE layer's forward+backward with every transformers
  kernel (grouped_mm, batched_mm, eager) on this device and keeps the fastest (what `experts_impl=auto` does).
- SFT: LoRA (r = --lora-r on attention, dense MLP and shared experts) with gradient checkpointing, bf16, the loss from
  chunked log-probs (full logits never materialised), AdamW; tokens/s = batch x seq / median step time.
  MFU = model FLOPs / (step time x peak bf16 FLOP/s) on activated parameters N_act (input embedding excluded):
  6 N_act per token (the usual convention, forward + backward with weight gradients) plus causal attention
  (6 x layers x heads x (d_qk + d_v) x seq / 2 per token); the LoRA-exact count (4 N_act: frozen weights get no
  weight gradients) is printed beside it. Recomputation by gradient checkpointing is not counted (MFU, not HFU).
- GRPO step (LoRA, reference = adapters off): generation of prompts x G completions of exactly --new-tokens tokens
  (EOS suppressed), reference log-probs, policy forward + backward of the clipped-surrogate + k3 loss, optimizer
  step, weight sync (with vLLM importable: `VLLMEngine.sync_weights`; without: merging LoRA and renaming to the
  checkpoint layout, the trainer's side of a sync). Rewards are random numbers (a reward's cost is the user's).
- Generation floor: every decode step must read the weights it uses once (non-expert weights, output head, and the
  routed experts the batch touches: E x (1 - (1 - k/E)^B) per layer for B sequences) plus the MLA latent cache
  ((kv_lora_rank + rope dim) x 2 bytes per token per layer) at HBM bandwidth; floor tok/s = B / that time, at the
  mean context. Bandwidth by device name (H100 SXM 3.35 TB/s, H100 PCIe 2.0, H200 4.8, A100 2.0) or --bandwidth.
- Peak GPU memory: torch.cuda.max_memory_allocated over the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0}  # dense, SXM figures
HBM_TB_S = {"H200": 4.8, "H100 PCIe": 2.0, "H100": 3.35, "A100": 2.0, "L40S": 0.864}


def lookup(table: dict, device_name: str):
    return next((v for k, v in table.items() if k in device_name), None)


def build(preset: str, device: torch.device, dtype: torch.dtype):
    """The preset's DeepseekV2ForCausalLM with random weights, created on `device` in `dtype` (no fp32 copy)."""
    from transformers import DeepseekV2ForCausalLM

    from align.model.presets import preset_config

    config = preset_config(preset)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DeepseekV2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward in the GRPO update")
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--sft-seq", type=int, default=2048)
    ap.add_argument("--sft-steps", type=int, default=5)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (default: by device name)")
    ap.add_argument("--bandwidth", type=float, help="memory bandwidth in TB/s (default: by device name)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    from align.grpo.core import LossSettings, group_advantages, grpo_loss
    from align.model.logprobs import forward_logprobs
    from align.model.moe import measure_experts_impl
    from align.model.policy import LoRAConfig, apply_lora
    from align.model.presets import parameter_counts
    from align.rollout.hf import HFEngine
    from align.rollout.protocol import SamplingConfig
    from align.rollout.weights import iter_checkpoint_weights, iter_merged_weights
    from align.tiny import corpus_texts
    from align.model.tokenizer import train_tokenizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    res: dict = {"device": name, "torch": torch.__version__, "preset": args.preset, "dtype": str(dtype)}
    torch.manual_seed(0)

    model, res["build_s"] = timed(lambda: build(args.preset, device, dtype), sync)
    cfg = model.config
    total, active = parameter_counts(model)
    res.update(params_total=total, params_active=active)
    print(f"device: {name}; torch {torch.__version__}; {args.preset}: {total / 1e9:.2f}B parameters, "
          f"{active / 1e9:.2f}B activated; built in {res['build_s']:.1f} s", flush=True)
    res["experts_kernel"] = measure_experts_impl(model, tokens=4096 if cuda else 256)
    print(f"experts kernel (measured): {res['experts_kernel']}", flush=True)
    tok = train_tokenizer(corpus_texts())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    policy = apply_lora(model, LoRAConfig(enabled=True, r=args.lora_r, alpha=2 * args.lora_r))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)

    # -- 1. SFT throughput (LoRA, chunked log-prob loss)
    ids = torch.randint(3, cfg.vocab_size, (args.sft_batch, args.sft_seq), device=device)

    def sft_step():
        loss = -forward_logprobs(policy, ids, args.sft_seq - 1).logprobs.float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = [timed(sft_step, sync)[1] for _ in range(args.sft_steps + 1)][1:]
    step_s = statistics.median(times)
    tokens_s = args.sft_batch * args.sft_seq / step_s
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * args.sft_seq / 2
    peak = (args.peak_tflops or lookup(PEAK_BF16_TFLOPS, name) or float("nan")) * 1e12
    res.update(sft_step_s=step_s, sft_tokens_s=tokens_s, sft_mfu=(6 * active + attn) * tokens_s / peak,
               sft_mfu_lora_exact=(4 * active + attn * 2 / 3) * tokens_s / peak)
    print(f"SFT (LoRA r={args.lora_r}, {args.sft_batch}x{args.sft_seq} tokens, grad. checkpointing): "
          f"{tokens_s:,.0f} tokens/s, {step_s:.2f} s/step; MFU {res['sft_mfu']:.1%} (6N) / "
          f"{res['sft_mfu_lora_exact']:.1%} (LoRA-exact 4N)", flush=True)

    # -- 2. one GRPO step, 16 prompts x G=16 x 512 new tokens by default
    rows = [json.loads(x) for x in (ROOT / "data" / "arith" / "rl_prompts.jsonl").read_text().splitlines()]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows[:args.prompts]]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens,
                              batch_size=args.prompts * args.group)
    model.config.use_cache = True
    model.generation_config.suppress_tokens = [tok.eos_token_id]  # exactly --new-tokens per completion
    engine = HFEngine(policy, tok)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    r, res["grpo_generate_s"] = timed(lambda: engine.generate(prompts, n=args.group, sampling=sampling), sync)
    model.config.use_cache = False
    generated = int(r.completion_mask.sum())
    n_rows, C = r.completion_ids.shape
    batch_ids = torch.cat([r.prompt_ids, r.completion_ids], 1).to(device)
    attn_mask = torch.cat([r.prompt_mask, r.completion_mask], 1).to(device)
    loss_mask = r.completion_mask.to(device)
    adv = group_advantages(torch.randn(n_rows), args.group).to(device)
    micro = [torch.arange(s, min(s + args.micro_batch, n_rows)) for s in range(0, n_rows, args.micro_batch)]

    def reference():
        with torch.no_grad(), policy.disable_adapter():
            return torch.cat([forward_logprobs(policy, batch_ids[m], C, attn_mask[m]).logprobs for m in micro])

    ref, res["grpo_ref_s"] = timed(reference, sync)

    def update():
        for m in micro:
            lp = forward_logprobs(policy, batch_ids[m], C, attn_mask[m]).logprobs
            loss = grpo_loss(lp, lp.detach(), ref[m], adv[m], loss_mask[m], LossSettings(beta=0.04)) * len(m) / n_rows
            loss.backward()

    _, res["grpo_policy_fwd_bwd_s"] = timed(update, sync)
    _, res["grpo_optimizer_s"] = timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)), sync)
    try:
        from align.rollout.vllm import vllm_missing

        has_vllm = vllm_missing() is None
    except Exception:
        has_vllm = False
    sync_what = "merge LoRA + rename, streamed as the vLLM sync does (vLLM absent)"
    _, res["grpo_weight_sync_s"] = timed(
        lambda: sum(t.numel() for _, t in iter_checkpoint_weights(policy, iter_merged_weights(policy))), sync)
    if has_vllm:
        sync_what = "not measured with vLLM here: needs a model directory"  # the engine loads from a path
    res["grpo_step_s"] = sum(res[k] for k in ("grpo_generate_s", "grpo_ref_s", "grpo_policy_fwd_bwd_s",
                                              "grpo_optimizer_s", "grpo_weight_sync_s"))
    print(f"GRPO step (LoRA, {args.prompts} prompts x G={args.group} x {args.new_tokens} new tokens): "
          f"{res['grpo_step_s']:.1f} s = generation {res['grpo_generate_s']:.1f} + reference "
          f"{res['grpo_ref_s']:.1f} + policy fwd/bwd {res['grpo_policy_fwd_bwd_s']:.1f} + optimizer "
          f"{res['grpo_optimizer_s']:.2f} + weight sync {res['grpo_weight_sync_s']:.2f} ({sync_what})", flush=True)

    # -- 3. generation against the bandwidth floor
    B = n_rows
    bytes_per = torch.finfo(dtype).bits // 8
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    other = sum(p.numel() for n, p in model.named_parameters()
                if ".mlp.experts." not in n and not n.endswith("embed_tokens.weight"))
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = 1 - (1 - k / E) ** B                                     # share of routed experts a step reads
    ctx = r.prompt_ids.shape[1] + args.new_tokens / 2
    kv = B * ctx * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per * cfg.num_hidden_layers
    step_bytes = (other + routed * touched) * bytes_per + kv
    bw = (args.bandwidth or lookup(HBM_TB_S, name) or float("nan")) * 1e12
    floor = B / (step_bytes / bw)
    res.update(gen_tokens_s=generated / res["grpo_generate_s"], gen_floor_tokens_s=floor,
               gen_share_of_floor=generated / res["grpo_generate_s"] / floor, gen_bytes_per_step=step_bytes)
    print(f"generation (transformers generate): {res['gen_tokens_s']:,.0f} tok/s; bandwidth floor "
          f"{floor:,.0f} tok/s ({step_bytes / 1e9:.1f} GB per decode step of {B} sequences at "
          f"{bw / 1e12:.2f} TB/s): {res['gen_share_of_floor']:.1%} of the floor", flush=True)
    if cuda:
        res["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        print(f"peak GPU memory (GRPO step): {res['peak_gpu_memory_gb']:.1f} GB; fits in 80 GB: "
              f"{'yes' if res['peak_gpu_memory_gb'] < 80 else 'no'}", flush=True)
    res = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
