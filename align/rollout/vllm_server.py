"""Rollouts from a separate vLLM server: DeepSeek-V2 §4.2's hybrid engine, inference with its own parallelism.

The server is plain vLLM (`python -m vllm.entrypoints.openai.api_server` in dev mode) plus align's worker extension
`WeightReceiver` (`--worker-extension-cls`); its tensor / data / expert parallelism and multi-node placement are
vLLM's own. `server_command` is its command line, `align serve` runs it, and `rollout.server.launch` starts one beside
the trainer (single node, CI).

Generation: every training process sends its own prompts as token ids, one /v1/completions request per prompt (n = G,
a per-request seed, `logprobs: 0` for each sampled token's log-prob after temperature, the tokenizer's stop ids),
all at once so the server batches them; the answers fill the same `Rollouts` as the other engines.

Weight sync after each update (`sync_weights`), transport by `rollout.server.transport`:
  gloo (CPU) / nccl (GPU): a process group of the trainer's rank 0 (group rank 0, hosting the rendezvous store) and
    every server worker (group rank 1 + its vLLM rank), made once at start. A sync is one control call
    (/collective_rpc `align_receive`, on a helper thread) while the main thread broadcasts the weights in buckets of
    bucket_mb: a length pair, a JSON header (names, dtypes, shapes, offsets), one flat byte buffer.
  disk: rank 0 writes safetensors files to weights_dir (a filesystem both sides see); the server reads them back.
  Either way every training process takes part in the gather (FSDP2 / ZeRO-3 shards, LoRA merged on the fly:
  `weights.iter_merged_weights`), only rank 0 sends, and on the server each worker feeds the stream to vLLM's
  `reload_weights`, which re-derives MLA's absorbed W_UK / W_UV, then refreshes the CPU fused-MoE kernel's
  prepacked experts (`vllm._reload_weights`). Each worker answers with the version (the training step) and the
  tensor and byte counts it took; any difference from what was sent, a server that does not answer within
  timeout_s, or a broken group raises `ServerError` naming the server and the step, on every training process.
Parity gate (on by default): after every check_every-th sync the server's prompt log-probs on a fixed probe are
  compared with the trainer's own forward (`rollout/sync_max_abs_diff`); above check_tol the run stops, naming the
  first layer whose output differs between the two (both sides' per-layer outputs on the probe, projected to 8
  dimensions by one seeded matrix: `WeightReceiver.align_probe_*`).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import time
import urllib.parse
from pathlib import Path

import torch

from ..errors import AlignError
from ..run.data import stop_token_ids
from .hf import prompt_texts
from .protocol import RolloutConfig, Rollouts, SamplingConfig, pack_rollouts, vllm_sampling
from .server_client import (
    ALIGN_EXTENSION,
    Background,
    LaunchedServer,
    ServerClient,
    ServerError,
    _free_port,
    _route_to,
    server_command,
)
from .server_worker import (  # noqa: F401
    ALIGNMENT,
    WeightReceiver,
    _buckets,
    _projection,
    _unpack,
    probed_modules,
    receive_weights,
    send_weights,
    weight_group,
)
from .weights import iter_checkpoint_weights, iter_merged_weights

DEFAULT_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.1}  # kernel noise is ~1e-6 / ~0.05 nats

def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _share(value, device):
    """Rank 0's `value` on every training process (itself when there is one process)."""
    dist = _dist()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device if dist.get_backend() == "nccl" else None)
    return box[0]


def _on_rank0(fn, is_main: bool, device):
    """fn() on rank 0 alone (it talks to the server); if it raises, every training process raises, so that none
    goes on into the next collective and hangs there. Rank 0's failures that are not align's own become
    ServerError (a malformed answer is the server's fault)."""
    error, result = None, None
    if is_main:
        try:
            result = fn()
        except AlignError as e:
            error = e
        except Exception as e:  # noqa: BLE001 (a malformed answer: KeyError, JSON, ...)
            error = ServerError(f"{type(e).__name__}: {e}")
    message = _share(str(error) if error else None, device)
    if error is not None:
        raise error
    if message:
        raise ServerError(message)
    return result


def _suspect(trainer: dict, server: dict, classes: dict, tol: float) -> str:
    """The first probed module whose output differs between trainer and server beyond `tol` (relative)."""
    for name in probed_modules(list(trainer)):
        if name not in server:
            return f"{name} ({classes.get(name, '?')}): the server recorded no output for it"
        a, b = torch.tensor(trainer[name]), torch.tensor(server[name])
        rel = ((a - b).abs().max() / a.abs().max().clamp_min(1e-6)).item()
        if rel > tol:
            return (f"{name} ({classes.get(name, '?')} in vLLM): its output differs by {rel:.3g} (relative) while "
                    f"every module before it agrees; suspect that layer class's weight reload")
    return "no single layer: every probed module agrees, so suspect the embedding, final norm or LM head"


class VLLMServerEngine:
    runs_ahead = True      # generation may overlap training (rollout.max_off_policy_steps > 0: align/grpo/ahead.py)
    own_weights = True     # the server holds its own copy: the policy may wait on CPU meanwhile (offload_policy)
    cheap_routes = False   # routes only when asked for (routing_replay=rollout; the server must return them)
    sized_by_prompts = True  # its KV cache is sized for max_model_len

    @classmethod
    def check(cls, rollout: RolloutConfig, model_dtype: str, replay_routes: bool) -> None:
        """The server settings, without a server: url or launch (launch needs vLLM here), a transport this machine
        has, positive limits."""
        from ..config import require
        from ..model.policy import resolve_dtype
        from .vllm import choose_attention_backend, vllm_missing

        s = rollout.server
        require(bool(s.url) != s.launch, "rollout.server.url", "a server URL (http://host:port) or, instead, "
                "rollout.server.launch=true", s.url or "(empty, launch false)")
        if s.url:
            parsed = urllib.parse.urlparse(s.url)
            require(parsed.scheme in ("http", "https") and bool(parsed.hostname), "rollout.server.url",
                    "http://host:port", s.url)
        if s.launch:
            missing = vllm_missing()
            require(missing is None, "rollout.server.launch", f"vLLM installed here to start a server; {missing}",
                    True)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            choose_attention_backend(rollout.attention_backend, device.type, resolve_dtype(model_dtype, device))
        require(s.transport in ("auto", "gloo", "nccl", "disk"), "rollout.server.transport",
                "auto, gloo, nccl or disk", s.transport)
        if s.transport == "nccl":
            require(torch.cuda.is_available(), "rollout.server.transport", "gloo or disk on a machine without a "
                    "GPU (nccl is CUDA-only)", s.transport)
        for key in ("timeout_s", "start_timeout_s", "generate_timeout_s", "bucket_mb"):
            require(getattr(s, key) > 0, f"rollout.server.{key}", "positive", getattr(s, key))
        require(s.tensor_parallel_size >= 1, "rollout.server.tensor_parallel_size", ">= 1", s.tensor_parallel_size)
        require(s.check_every >= 0, "rollout.server.check_every", ">= 0 (0: no parity gate)", s.check_every)
        require(s.check_tol is None or s.check_tol > 0, "rollout.server.check_tol", "positive (unset: by dtype)",
                s.check_tol)
        require(0 <= s.group_port < 65536, "rollout.server.group_port", "a port (0: a free one)", s.group_port)

    @classmethod
    def start(cls, rollout: RolloutConfig, ctx) -> VLLMServerEngine:
        engine = cls(rollout, ctx)
        engine.sync_weights(ctx.model)  # the policy's weights as this run starts (resumed / adapted), not the server's
        return engine

    def __init__(self, rollout: RolloutConfig, ctx):
        self.cfg, self.s = rollout, rollout.server
        self.tokenizer, self.dtype, self.device = ctx.tokenizer, ctx.dtype, torch.device(ctx.device)
        self.seed, self.calls, self.max_model_len = ctx.seed, 0, ctx.max_model_len
        self.version = ctx.step - 1  # start's push is version ctx.step: the weights after that many updates
        dist = _dist()
        self.rank = dist.get_rank() if dist else 0
        self.is_main = self.rank == 0
        self.record_routes = ctx.record_routes
        self.pause_for_sync = False  # set while rollouts run ahead (align/grpo/ahead.py): pushes meet live requests
        self.last_sync_s, self.sync_metrics, self.syncs = 0.0, {}, 0
        self.server: LaunchedServer | None = None
        self.group = self.store = None
        self.probe_ids: list[int] | None = None
        url = self.s.url or f"http://127.0.0.1:{self.s.port}"
        self.client = ServerClient(url, self.s.timeout_s)
        self.transport = self.s.transport if self.s.transport != "auto" else (
            "nccl" if self.device.type == "cuda" else "gloo")
        self.tol = self.s.check_tol or DEFAULT_TOL.get(self.dtype, 1e-3)
        self.weights_dir = Path(self.s.weights_dir or Path(ctx.output_dir or ".") / "server_weights")
        self.written: list[Path] = []  # disk transport: the folders this engine wrote (it removes only those)
        _on_rank0(lambda: self._connect(ctx), self.is_main, self.device)
        if not self.is_main:
            self._wait_healthy()
        atexit.register(self.close)

    def _wait_healthy(self) -> None:
        t = time.monotonic()
        while not self.client.healthy():
            if time.monotonic() - t > self.s.start_timeout_s:
                raise ServerError(f"vLLM server {self.client.url} is not reachable from process {self.rank}")
            time.sleep(2)

    def _connect(self, ctx) -> None:
        """Rank 0: start (launch) or reach the server, check it serves what this run needs, join the weight group."""
        from .vllm import choose_attention_backend

        if self.s.launch:
            on_cpu = self.device.type == "cpu"
            cmd, env = server_command(
                ctx.model_path, dtype=self.dtype, max_model_len=ctx.max_model_len, port=self.s.port,
                tensor_parallel_size=self.s.tensor_parallel_size, seed=ctx.seed, on_cpu=on_cpu,
                attention_backend=choose_attention_backend(self.cfg.attention_backend, self.device.type, self.dtype),
                record_routes=self.record_routes, extra_args=tuple(self.s.extra_args))
            self.server = LaunchedServer(cmd, env, Path(ctx.output_dir or ".") / "vllm_server.log", self.client.url,
                                         self.s.start_timeout_s)
        info = self.client.describe()
        if not info["reachable"]:
            raise ServerError(f"vLLM server {self.client.url} is not reachable (GET /health); start it with "
                              f"`align serve` (README: Rollouts on a vLLM server) or set rollout.server.launch=true")
        if not info.get("extension"):
            raise ServerError(f"vLLM server {self.client.url} (vLLM {info.get('vllm')}) has no align worker "
                              f"extension or no dev mode: start it with VLLM_SERVER_DEV_MODE=1 and "
                              f"--worker-extension-cls {ALIGN_EXTENSION} (`align serve` does both). "
                              f"{info.get('extension_error', '')}")
        if (info.get("max_model_len") or 0) < ctx.max_model_len:
            raise ServerError(f"vLLM server {self.client.url} serves max_model_len {info.get('max_model_len')}, "
                              f"but this run needs {ctx.max_model_len} (longest prompt + sampling.max_new_tokens)")
        self.model_name, self.world = info["model"], info["world_size"]
        print(f"rollout: vLLM server {self.client.url} (vLLM {info['vllm']}, {self.world} worker"
              f"{'s' if self.world > 1 else ''}), weights by {self.transport}", flush=True)
        if self.transport != "disk":
            self._join()

    def _join(self) -> None:
        host = self.s.group_host or ("127.0.0.1" if self.s.launch else _route_to(self.client.url))
        port = self.s.group_port or _free_port()
        args = {"host": host, "port": port, "world_size": 1 + self.world, "backend": self.transport,
                "timeout_s": self.s.timeout_s, "version": self.version}
        call = Background(lambda: self.client.rpc("align_join", args, what="joining the weight group"))
        try:
            self.store, self.group = weight_group(host, port, 0, 1 + self.world, self.transport, self.s.timeout_s)
        except Exception as e:  # noqa: BLE001 (the store or the group: reported with the server's own answer)
            raise ServerError(f"vLLM server {self.client.url}: no weight group at {host}:{port} within "
                              f"rollout.server.timeout_s={self.s.timeout_s:g} s ({e}; the server said: "
                              f"{call.error(5)})") from None
        call.result(self.s.timeout_s, self.client.url, "joining the weight group")

    # -- weight sync
    def sync_weights(self, model) -> None:
        """Push `model`'s weights (the next version); then, every check_every-th sync, the parity gate."""
        t = time.perf_counter()
        version = self.version + 1  # self.version moves only once the server holds it (what generate records)
        weights = iter_checkpoint_weights(model, iter_merged_weights(model))   # lazy, gathered one at a time
        weights = ((n, w.to(self.dtype) if w.is_floating_point() else w) for n, w in weights)  # fp32 masters
        if not self.is_main:
            for _ in weights:  # the gathers are collectives: every process walks the stream
                pass
        _on_rank0(lambda: self._push(weights, version), self.is_main, self.device)
        self.version = version
        self.syncs += 1
        self.sync_metrics = {}
        if self.s.check_every and self.syncs % self.s.check_every == 0:
            self._gate(model)
        self.last_sync_s = time.perf_counter() - t

    def _push(self, weights, version: int, refresh_experts: bool = True) -> None:
        """Rank 0: send `weights` as `version`; with requests in flight (rollouts ahead), the server is paused
        meanwhile and every cached KV, running requests' too, is dropped before it resumes."""
        if self.pause_for_sync:
            self.client.call("POST", "/pause?mode=keep", what="pausing generation for a weight push")
        try:
            self._send(weights, version, refresh_experts)
        finally:
            if self.pause_for_sync:
                self.client.call("POST", "/resume", what="resuming generation after a weight push")

    def _send(self, weights, version: int, refresh_experts: bool) -> None:
        where = f"weight push for step {version}"
        args = {"version": version, "refresh_experts": refresh_experts}
        if self.transport == "disk":
            sent = self._write_dir(weights, args)
            answers = self.client.rpc("align_receive", args, what=where)
        else:
            call = Background(lambda: self.client.rpc("align_receive", args, timeout=None, what=where))
            device = self.device if self.transport == "nccl" else torch.device("cpu")
            try:
                sent = send_weights(self.group, weights, self.s.bucket_mb << 20, device)
            except Exception as e:  # noqa: BLE001 (gloo / nccl errors: the server is named, its answer beside)
                raise ServerError(f"vLLM server {self.client.url}: {where} broke off ({type(e).__name__}: "
                                  f"{str(e)[:300]}; the server said: {call.error(5)})") from None
            answers = call.result(self.s.timeout_s, self.client.url, where)
        self._check_answers(answers, sent, where, version)
        self._remove_written(keep=0)
        reset = "/reset_prefix_cache?reset_running_requests=true" if self.pause_for_sync else "/reset_prefix_cache"
        self.client.call("POST", reset, what="resetting the prefix cache")  # KV computed with the old weights

    def _write_dir(self, weights, args: dict) -> tuple[int, int]:
        from safetensors.torch import save_file

        path = self.weights_dir / f"step-{args['version']:06d}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = sent = 0
        for i, (header, buffer) in enumerate(_buckets(weights, self.s.bucket_mb << 20)):
            save_file({n: t.clone() for n, t in _unpack(header, buffer)}, str(path / f"part-{i:05d}.safetensors"))
            tensors, sent = tensors + len(header), sent + sum(h[4] for h in header)
        args["path"] = str(path.resolve())
        self.written.append(path)
        return tensors, sent

    def _remove_written(self, keep: int) -> None:
        """Delete the weight folders this engine wrote, all but the newest `keep`."""
        while len(self.written) > keep:
            old = self.written.pop(0)
            for f in old.glob("part-*.safetensors"):
                f.unlink()
            try:
                old.rmdir()
            except OSError:  # something else was put there: left as it is
                pass

    def _check_answers(self, answers: list, sent: tuple[int, int], where: str, version: int) -> None:
        if len(answers) != self.world:
            raise ServerError(f"vLLM server {self.client.url}: {where}: {len(answers)} workers answered, "
                              f"{self.world} joined")
        for a in answers:
            if not isinstance(a, dict) or a.get("version") != version or (a["tensors"], a["bytes"]) != sent:
                raise ServerError(f"vLLM server {self.client.url}: {where}: a worker took {a}, but version "
                                  f"{version} with {sent[0]} tensors / {sent[1]} bytes was sent")

    # -- the parity gate
    def _probe(self) -> list[int]:
        if self.probe_ids is None:
            messages = [[{"role": "user", "content": "Check: what is 17 + 25? Think step by step."}]]
            text = prompt_texts(self.tokenizer, messages)[0] + "17 + 25 = 42. The answer is \\boxed{42}."
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self.probe_ids = ids[:max(2, self.max_model_len - 1)]  # within the server's context (checked at start)
        return self.probe_ids

    @torch.no_grad()
    def _trainer_probe(self, model, hooks: bool = False) -> tuple[torch.Tensor, dict]:
        """The trainer's log-probs of the probe's tokens 1.. (and, with hooks, its probed modules' outputs)."""
        from ..model.policy import causal_lm

        ids = torch.tensor([self._probe()], device=self.device)                             # [1, T]
        inner = causal_lm(model)
        modules = dict(inner.named_modules())
        outputs, handles = {}, []
        if hooks:
            for name in probed_modules(list(modules)):
                def hook(module, inputs, output, name=name):
                    out = (output[0] if isinstance(output, tuple) else output)[0].float()   # [T, H]
                    outputs[name] = (out @ _projection(out.shape[-1], out.device)).cpu().tolist()
                handles.append(modules[name].register_forward_hook(hook))
        param = next(model.parameters())
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=param.dtype != self.dtype)
        try:
            with autocast:
                logits = model(input_ids=ids).logits.float()                                # [1, T, V]
        finally:
            for h in handles:
                h.remove()
        logprobs = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]        # [T-1]
        return logprobs.cpu(), outputs

    def _server_probe(self) -> torch.Tensor:
        out = self.client.call("POST", "/v1/completions", {
            "model": self.model_name, "prompt": self._probe(), "max_tokens": 1, "temperature": 1.0,
            "prompt_logprobs": 0, "seed": 0}, timeout=self.s.generate_timeout_s, what="the parity probe")
        steps = out["choices"][0]["prompt_logprobs"][1:]
        return torch.tensor([step[str(t)]["logprob"] for step, t in zip(steps, self._probe()[1:])])    # [T-1]

    def _gate(self, model) -> None:
        """Compare the server's probe log-probs with the trainer's; stop the run (every process) above tol."""
        mine, _ = self._trainer_probe(model)  # every process: the forward gathers FSDP2 shards
        diff = _on_rank0(lambda: (mine - self._server_probe()).abs().max().item(), self.is_main, self.device)
        diff = _share(diff, self.device)
        self.sync_metrics = {"rollout/sync_max_abs_diff": diff}
        if diff > self.tol:
            where = self._diagnose(model)  # every process (its forward is in step); rank 0 asks the server
            raise ServerError(f"vLLM server {self.client.url} disagrees with the trainer after the weight push for "
                              f"step {self.version}: max |Δ log-prob| {diff:.3g} > rollout.server.check_tol "
                              f"{self.tol:g} on the parity probe. {where}")

    def _diagnose(self, model) -> str:
        """Where the two sides part: both record their probed modules' outputs on the probe."""
        def server_side() -> dict:
            self.client.rpc("align_probe_arm", {"tokens": len(self._probe())}, what="arming the layer probe")
            self.client.call("POST", "/reset_prefix_cache", what="resetting the prefix cache")
            self._server_probe()
            return next(iter(self.client.rpc("align_probe_collect", what="collecting the layer probe")), {})
        try:
            server = _on_rank0(server_side, self.is_main, self.device)
        except ServerError as e:
            return f"(The layer probe failed: {e})"
        _, mine = self._trainer_probe(model, hooks=True)
        if not self.is_main:
            return ""
        if not server.get("outputs"):
            return ("The server recorded no layer outputs (CUDA graphs and torch.compile skip module hooks: "
                    "run it with --enforce-eager to localise the layer).")
        return "First difference: " + _suspect(mine, server["outputs"], server["classes"], 10 * max(self.tol, 1e-3))

    # -- generation
    def generate(self, prompts: list[list[dict]], n: int, sampling: SamplingConfig) -> Rollouts:
        return self.generate_ids(self.tokenizer(prompt_texts(self.tokenizer, prompts), add_special_tokens=False)[
            "input_ids"], n, sampling)

    def generate_ids(self, ids: list[list[int]], n: int, sampling: SamplingConfig) -> Rollouts:
        tok = self.tokenizer
        greedy = sampling.temperature == 0
        self.calls += 1
        body = {"model": self._served_model(), "n": 1 if greedy else n,  # vLLM refuses n > 1 when greedy
                "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, **vllm_sampling(sampling), "logprobs": 0,
                "stop": sampling.stop or None, "include_stop_str_in_output": True,
                "stop_token_ids": stop_token_ids(tok), "return_token_ids": True, "skip_special_tokens": True}

        def one(i: int) -> dict:
            seed = (self.seed * 1_000_003 + self.calls * 10_007 + i) % 2**31  # per process, call and prompt
            return self.client.call("POST", "/v1/completions", {**body, "prompt": ids[i], "seed": seed},
                                    timeout=self.s.generate_timeout_s, what=f"generation for weight version "
                                    f"{self.version}")
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(64, len(ids)))) as pool:
            answers = list(pool.map(one, range(len(ids))))
        rows = []
        for p, a in zip(ids, answers):
            choices = sorted(a["choices"], key=lambda c: c["index"])
            choices = choices * n if greedy and len(choices) == 1 else choices  # G copies of the one greedy answer
            if len(choices) != n:
                raise ServerError(f"vLLM server {self.client.url} returned {len(choices)} completions, {n} asked")
            rows += [(p, c) for c in choices]
        return self._rollouts(rows, n)

    def _served_model(self) -> str:
        if not hasattr(self, "model_name"):
            models = (self.client.call("GET", "/v1/models") or {}).get("data", [])
            self.model_name = models[0]["id"] if models else ""
        return self.model_name

    def _rollouts(self, rows: list, n: int) -> Rollouts:
        """`Rollouts` from (prompt ids, completions API choice) pairs."""
        out = pack_rollouts([(p, c["token_ids"], c["logprobs"]["token_logprobs"], c["finish_reason"] == "length")
                             for p, c in rows], n, self.tokenizer)
        if self.record_routes:
            out.routes = self._routes(rows, out.prompt_ids.shape[1], out.completion_ids.shape[1])
        return out

    def _routes(self, rows: list, P: int, C: int) -> torch.Tensor:
        """[N, P+C, L, k] from each choice's `routed_experts` (base64 .npy [prompt + completion − 1, L, k])."""
        import base64
        import io

        import numpy as np

        from .vllm import VLLMEngine

        url = self.client.url

        class Choice:  # the colocated engine's layout code takes objects with token_ids / routed_experts
            def __init__(self, c):
                if not c.get("routed_experts"):
                    raise ServerError(f"vLLM server {url} returned no MoE routes: start it with "
                                      f"--enable-return-routed-experts (routing_replay=rollout needs them)")
                self.routed_experts = np.load(io.BytesIO(base64.b64decode(c["routed_experts"])))
        return VLLMEngine._routes([(p, Choice(c)) for p, c in rows], P, C)

    def close(self) -> None:
        """Leave the weight group and stop a server this run started (idempotent)."""
        if self.group is not None and self.server is None:
            try:
                self.client.rpc("align_leave", timeout=10)
            except ServerError:
                pass
        self.group = self.store = None
        self._remove_written(keep=0)
        if self.server is not None:
            self.server.stop()
            self.server = None
