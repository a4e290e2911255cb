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


def build(preset: str, device: torch.device, dtype: torch.dtype, **overrides):
    """The preset's DeepseekV2ForCausalLM with random weights, created on `device` in `dtype` (no fp32 copy)."""
    from transformers import DeepseekV2ForCausalLM

    from align.model.presets import preset_config

    config = preset_config(preset, **overrides)
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
    ap.add_argument("--json", help="also write the figures to this file (rewritten after each section)")
    ap.add_argument("--full-layers", default="10,6,3",
                    help="full fine-tuning: layer counts to try, most first (the first that fits is measured)")
    ap.add_argument("--full-batch", type=int, default=4)
    ap.add_argument("--sections", default="full,bf16,lora",
                    help="comma list of: full (full-FT SFT, fp32 masters), bf16 (updates kept), lora (experts "
                         "kernels, LoRA SFT, GRPO step, generation floor)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    res: dict = {"device": name, "torch": torch.__version__, "preset": args.preset}
    import transformers

    res["transformers"] = transformers.__version__
    sections = {"full": full_ft_sft, "bf16": bf16_updates_kept, "lora": lora_grpo}
    for key in args.sections.split(","):
        try:
            sections[key](args, res)
        except Exception as e:  # a section that fails (OOM, a kernel missing) is recorded; the next one runs
            import traceback

            traceback.print_exc()
            res[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        if cuda:
            torch.cuda.empty_cache()
        dump(res, args.json)
    return res


def dump(res: dict, path: str | None) -> None:
    if path:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}
        Path(path).write_text(json.dumps(clean, indent=1))


def attention_flops_per_token(cfg, seq: int) -> float:
    """Causal attention's training FLOPs per token: 6 x layers x heads x (d_qk + d_v) x seq / 2."""
    return 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq / 2


def median_sft_step(model, opt, ids: torch.Tensor, steps: int, sync, autocast: bool = False) -> float:
    """Median seconds of `steps` SFT steps (chunked log-prob loss, backward, optimizer) after one warm-up step;
    `autocast`: forwards under bf16 autocast over the stored (fp32) weights."""
    from align.model.logprobs import forward_logprobs

    def step():
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = -forward_logprobs(model, ids, ids.shape[1] - 1).logprobs.float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return statistics.median([timed(step, sync)[1] for _ in range(steps + 1)][1:])


def full_ft_sft(args, res: dict) -> None:
    """Full fine-tuning SFT as align runs it in bf16: fp32 master weights, fp32 gradients and AdamW state
    (align.run.optim.build_optimizer), forwards under bf16 autocast (accelerate's mixed_precision in one process),
    gradient checkpointing, the chunked log-prob loss. Layers: the first count of --full-layers that fits."""
    from align.model.presets import parameter_counts
    from align.run.optim import build_optimizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = (args.peak_tflops or lookup(PEAK_BF16_TFLOPS, res["device"]) or float("nan")) * 1e12
    for layers in [int(x) for x in args.full_layers.split(",")]:
        model = opt = None
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(0)
            model = build(args.preset, device, torch.float32, num_hidden_layers=layers)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
            total, active = parameter_counts(model)
            opt = build_optimizer(model, lr=5e-6, weight_decay=0.0)
            ids = torch.randint(3, model.config.vocab_size, (args.full_batch, args.sft_seq), device=device)
            step_s = median_sft_step(model, opt, ids, args.sft_steps, sync, autocast=cuda)
            tokens_s = args.full_batch * args.sft_seq / step_s
            res.update(full_layers=layers, full_params_total=total, full_params_active=active,
                       full_step_s=step_s, full_tokens_s=tokens_s,
                       full_mfu=(6 * active + attention_flops_per_token(model.config, args.sft_seq)) * tokens_s / peak)
            if cuda:
                res["full_peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            print(f"full fine-tuning SFT ({layers} of the preset's layers, {total / 1e9:.2f}B parameters, "
                  f"{active / 1e9:.2f}B activated; fp32 masters + AdamW, bf16 autocast, {args.full_batch}x"
                  f"{args.sft_seq} tokens): {tokens_s:,.0f} tokens/s, {step_s:.2f} s/step, MFU {res['full_mfu']:.1%}, "
                  f"peak memory {res.get('full_peak_gpu_memory_gb', float('nan')):.1f} GB", flush=True)
            return
        except torch.OutOfMemoryError as e:
            res.setdefault("full_oom", []).append(f"{layers} layers: {str(e).splitlines()[0][:200]}")
            print(f"full fine-tuning with {layers} layers: out of memory", flush=True)
        finally:
            del model, opt
            if cuda:
                torch.cuda.empty_cache()


def bf16_updates_kept(args, res: dict) -> None:
    """Does one AdamW step at lr 1e-6 survive in bf16 at the preset's real widths? Two layers (the dense one and one
    MoE layer) with every width of the preset, one batch; updates Δ = W_after − W_before of (a) fp32, (b) bf16
    autocast over fp32 masters (align's path), (c) bf16 weights and AdamW state stepped in place. Prints the share of
    tensors and of parameters that moved and the median relative difference ‖Δ − Δ_fp32‖ / ‖Δ_fp32‖."""
    from align.model.logprobs import forward_logprobs
    from align.run.optim import build_optimizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    base = build(args.preset, device, torch.float32, num_hidden_layers=2)
    start = {k: v.detach().clone() for k, v in base.named_parameters()}
    ids = torch.randint(3, base.config.vocab_size, (2, min(args.sft_seq, 1024)), device=device)
    deltas = {}
    for mode in ("fp32", "bf16 (fp32 master)", "bf16 in place"):
        with torch.no_grad():
            for k, p in base.named_parameters():
                p.data = start[k].clone() if mode != "bf16 in place" else start[k].to(torch.bfloat16)
        opt = build_optimizer(base, lr=1e-6, weight_decay=0.0)
        before = {k: p.detach().float().clone() for k, p in base.named_parameters()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16 (fp32 master)" and cuda):
            loss = -forward_logprobs(base, ids, ids.shape[1] - 1).logprobs.float().mean()
        loss.backward()
        opt.step()
        deltas[mode] = {k: p.detach().float() - before[k] for k, p in base.named_parameters()}
        del opt
        base.zero_grad(set_to_none=True)
    ref = deltas["fp32"]
    for mode, d in deltas.items():
        moved = [k for k, v in d.items() if v.abs().max() > 0]
        n_moved = sum(int((v != 0).sum()) for v in d.values())
        n_all = sum(v.numel() for v in d.values())
        rel = [float((v - ref[k]).norm() / ref[k].norm()) for k, v in d.items() if ref[k].norm() > 0]
        key = mode.split()[0] + ("_master" if "master" in mode else "_inplace" if "place" in mode else "")
        res[f"bf16kept_{key}"] = {"tensors_moved": f"{len(moved)}/{len(d)}", "params_moved": n_moved / n_all,
                                  "rel_diff_median": statistics.median(rel) if rel else None,
                                  "rel_diff_max": max(rel) if rel else None}
        print(f"one step at lr 1e-6, {mode}: tensors moved {len(moved)}/{len(d)}, parameters moved "
              f"{n_moved / n_all:.2%}, rel. diff to fp32 median {res[f'bf16kept_{key}']['rel_diff_median']:.3g}",
              flush=True)
    del base, start, deltas


def lora_grpo(args, res: dict) -> None:

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
    name = res["device"]
    res["dtype"] = str(dtype)
    torch.manual_seed(0)

    model, res["build_s"] = timed(lambda: build(args.preset, device, dtype), sync)
    cfg = model.config
    total, active = parameter_counts(model)
    res.update(params_total=total, params_active=active)
    print(f"device: {name}; torch {torch.__version__}; {args.preset}: {total / 1e9:.2f}B parameters, "
          f"{active / 1e9:.2f}B activated; built in {res['build_s']:.1f} s", flush=True)
    cache = Path(args.json).with_suffix(".experts.json") if args.json else None
    res["experts_kernel"] = measure_experts_impl(model, tokens=4096 if cuda else 256,
                                                 cache=str(cache) if cache else None)
    if cache and cache.is_file():
        res["experts_kernel_s"] = next(iter(json.loads(cache.read_text()).values()))["seconds"]
    print(f"experts kernel (measured): {res['experts_kernel']}; one MoE layer fwd+bwd of "
          f"{4096 if cuda else 256} tokens, s: {res.get('experts_kernel_s')}", flush=True)
    dump(res, args.json)
    tok = train_tokenizer(corpus_texts())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    policy = apply_lora(model, LoRAConfig(enabled=True, r=args.lora_r, alpha=2 * args.lora_r))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)

    # -- 1. SFT throughput (LoRA, chunked log-prob loss)
    ids = torch.randint(3, cfg.vocab_size, (args.sft_batch, args.sft_seq), device=device)
    step_s = median_sft_step(policy, opt, ids, args.sft_steps, sync)
    tokens_s = args.sft_batch * args.sft_seq / step_s
    attn = attention_flops_per_token(cfg, args.sft_seq)
    peak = (args.peak_tflops or lookup(PEAK_BF16_TFLOPS, name) or float("nan")) * 1e12
    res.update(sft_step_s=step_s, sft_tokens_s=tokens_s, sft_mfu=(6 * active + attn) * tokens_s / peak,
               sft_mfu_lora_exact=(4 * active + attn * 2 / 3) * tokens_s / peak)
    dump(res, args.json)
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

    dump(res, args.json)

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
    dump(res, args.json)


if __name__ == "__main__":
    main()
