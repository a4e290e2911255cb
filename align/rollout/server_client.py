"""The vLLM server as a process and an HTTP endpoint: its command line (`server_command`, what `align serve` runs),
a server this run starts and stops (`LaunchedServer`), JSON calls that name the server in every failure
(`ServerClient`), and a control call on a helper thread beside the collective it pairs with (`Background`). The
engine that uses them: align/rollout/vllm_server.py."""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from ..errors import AlignError

ALIGN_EXTENSION = "align.rollout.server_worker.WeightReceiver"


class ServerError(AlignError, RuntimeError):
    """The vLLM server failed, did not answer in time, or answered what it should not; names the server and step."""


class ServerClient:
    """JSON over HTTP to one vLLM server; every failure is a ServerError naming it."""

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def call(self, method: str, path: str, body=None, timeout: float | None = -1.0, what: str = ""):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s if timeout == -1.0 else timeout) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[-2000:]
            raise ServerError(f"vLLM server {self.url}: {what or path} failed (HTTP {e.code}): {detail}") from None
        except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
            reason = getattr(e, "reason", e)
            raise ServerError(f"vLLM server {self.url}: {what or path} got no answer ({reason})") from None
        return json.loads(text) if text else None

    def rpc(self, method: str, args: dict | None = None, timeout: float | None = -1.0, what: str = "") -> list:
        """/collective_rpc on every worker: their answers, one per worker."""
        out = self.call("POST", "/collective_rpc", {"method": method, "args": [json.dumps(args or {})]},
                        timeout=timeout, what=what or method)
        return (out or {}).get("results", [])

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def describe(self) -> dict:
        """vLLM version, served model and context, worker count, whether align's extension is loaded."""
        info = {"url": self.url, "reachable": self.healthy()}
        if not info["reachable"]:
            return info
        info["vllm"] = (self.call("GET", "/version") or {}).get("version")
        models = (self.call("GET", "/v1/models") or {}).get("data", [])
        if models:
            info["model"], info["max_model_len"] = models[0]["id"], models[0].get("max_model_len")
        try:
            workers = self.rpc("align_info", what="the align worker extension")
            info["world_size"] = len(workers)
            info["extension"] = all(isinstance(w, dict) and w.get("extension") for w in workers) and bool(workers)
        except ServerError as e:
            info["extension"], info["extension_error"] = False, str(e)
        return info


def server_command(model_path: str, *, dtype: torch.dtype, max_model_len: int, port: int, host: str = "127.0.0.1",
                   tensor_parallel_size: int = 1, seed: int = 0, on_cpu: bool, attention_backend: str | None,
                   record_routes: bool = False, extra_args: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """The vLLM server's command line and environment for serving `model_path` to align (its flags and why)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--host", host, "--port", str(port), "--dtype", str(dtype).removeprefix("torch."),
           "--max-model-len", str(max_model_len), "--seed", str(seed),
           "--logprobs-mode", "processed_logprobs",                   # sampled tokens' log-probs after temperature
           "--worker-extension-cls", ALIGN_EXTENSION,                  # weight pushes and the parity probe
           "--tensor-parallel-size", str(tensor_parallel_size)]
    env = {"VLLM_SERVER_DEV_MODE": "1"}                                # /collective_rpc, /reset_prefix_cache
    if tensor_parallel_size > 1:
        cmd += ["--distributed-executor-backend", "mp"]               # no Ray
    if attention_backend:
        cmd += ["--attention-backend", attention_backend]
    if record_routes:
        cmd += ["--enable-return-routed-experts"]
    if on_cpu:  # see align/rollout/vllm.py: PyTorch-native rope, eager, threads left unbound, a small KV cache
        cmd += ["--enforce-eager", "--compilation-config", json.dumps({"custom_ops": ["all", "-rotary_embedding"]})]
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1")
    return cmd + list(extra_args), env


class LaunchedServer:
    """A vLLM server this run started (rollout.server.launch); stopped with its whole process group on close or at
    exit."""

    def __init__(self, cmd: list[str], env: dict, log_path: Path, url: str, start_timeout_s: float):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path, self.url = log_path, url
        self.log = open(log_path, "ab")  # noqa: SIM115 (the server writes to it until stop)
        t = time.monotonic()
        print(f"rollout: starting the vLLM server at {url} (log: {log_path})", flush=True)
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        atexit.register(self.stop)
        client = ServerClient(url, 10)
        while not client.healthy():
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"vLLM server {url} exited with code {self.proc.returncode} while starting; the "
                                  f"end of its log ({log_path}):\n{self.tail()}")
            if time.monotonic() - t > start_timeout_s:
                self.stop()
                raise ServerError(f"vLLM server {url} was not healthy after rollout.server.start_timeout_s="
                                  f"{start_timeout_s:g} s; the end of its log ({log_path}):\n{self.tail()}")
            time.sleep(2)
        self.start_s = time.monotonic() - t
        print(f"rollout: vLLM server healthy after {self.start_s:.0f} s", flush=True)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _route_to(url: str) -> str:
    """This machine's address on the route to the server's host (what its workers can reach us at)."""
    host = urllib.parse.urlparse(url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # no packet is sent: this only picks the interface
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


class Background:
    """A control call on a helper thread while the main thread runs the collective it pairs with."""

    def __init__(self, fn):
        self.value, self.exc = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.value = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the main thread)
            self.exc = e

    def error(self, wait_s: float) -> str:
        self.thread.join(wait_s)
        if self.thread.is_alive():
            return "nothing yet"
        return str(self.exc) if self.exc else "ok"

    def result(self, timeout_s: float, url: str, what: str):
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise ServerError(f"vLLM server {url}: {what} did not finish within rollout.server.timeout_s="
                              f"{timeout_s:g} s")
        if self.exc is not None:
            raise self.exc
        return self.value
