"""The vLLM server engine's parts that need no vLLM: the bucketed weight stream over a real gloo group, settings
validation, the answers it parses, the layer diagnosis, and that nothing waits forever on a server that is gone or
silent. (The engine against a real server: tests/test_vllm_server.py, in the vLLM venv.)"""

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch

from align.config import ConfigError
from align.rollout import vllm_server as vs
from align.rollout.protocol import RolloutConfig, ServerConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_buckets_round_trip_every_dtype_and_shape_at_aligned_offsets():
    weights = [("a", torch.randn(3, 5)), ("b", torch.randn(7).bfloat16()), ("c", torch.arange(5)),
               ("d", torch.randn(1000)), ("e", torch.zeros(0, 4)), ("f", torch.randn(2, 2).half())]
    buckets = list(vs._buckets(iter(weights), bucket_bytes=1024))
    assert len(buckets) > 1                                   # split by size; the 4000-byte tensor alone
    back = [item for header, buf in buckets for item in vs._unpack(header, buf)]
    assert [n for n, _ in back] == [n for n, _ in weights]
    for (_, a), (_, b) in zip(weights, back):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert all(h[3] % vs.ALIGNMENT == 0 for header, _ in buckets for h in header)


def test_a_push_over_a_gloo_group_arrives_whole_and_counted():
    """Group rank 0 sends, a 'worker' (rank 1, another thread) receives: names, values and counts as sent."""
    port = _free_port()
    weights = {f"w{i}": torch.randn(i + 1, 33) for i in range(12)} | {"h": torch.randn(4).bfloat16()}
    got, counts = {}, {"tensors": 0, "bytes": 0}

    def worker():
        _, group = vs.weight_group("127.0.0.1", port, 1, 2, "gloo", 20)
        for name, t in vs.receive_weights(group, torch.device("cpu"), counts):
            got[name] = t.clone()
    th = threading.Thread(target=worker)
    th.start()
    _, group = vs.weight_group("127.0.0.1", port, 0, 2, "gloo", 20)
    sent = vs.send_weights(group, iter(weights.items()), 512, torch.device("cpu"))
    th.join(20)
    assert sent == (counts["tensors"], counts["bytes"]) == (13, sum(t.numel() * t.element_size()
                                                                    for t in weights.values()))
    assert all(torch.equal(got[k], v) for k, v in weights.items())


def test_a_receiver_whose_sender_vanishes_times_out_instead_of_hanging():
    port = _free_port()
    errors = []

    def worker():
        try:
            _, group = vs.weight_group("127.0.0.1", port, 1, 2, "gloo", 3)
            list(vs.receive_weights(group, torch.device("cpu"), {"tensors": 0, "bytes": 0}))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    th = threading.Thread(target=worker)
    th.start()
    _store, _group = vs.weight_group("127.0.0.1", port, 0, 2, "gloo", 3)  # joins, then never sends
    t = time.monotonic()
    th.join(30)
    assert not th.is_alive() and errors and time.monotonic() - t < 30


def _check(**server):
    vs.VLLMServerEngine.check(RolloutConfig(engine="vllm_server", server=ServerConfig(**server)), "float32", False)


@pytest.mark.parametrize("server, key", [
    ({}, "rollout.server.url"),                                            # neither url nor launch
    ({"url": "http://h:1", "launch": True}, "rollout.server.url"),         # both
    ({"url": "h:8000"}, "rollout.server.url"),                             # no scheme
    ({"url": "http://h:1", "transport": "tcp"}, "rollout.server.transport"),
    ({"url": "http://h:1", "timeout_s": 0}, "rollout.server.timeout_s"),
    ({"url": "http://h:1", "bucket_mb": 0}, "rollout.server.bucket_mb"),
    ({"url": "http://h:1", "check_every": -1}, "rollout.server.check_every"),
    ({"url": "http://h:1", "check_tol": 0.0}, "rollout.server.check_tol"),
    ({"url": "http://h:1", "tensor_parallel_size": 0}, "rollout.server.tensor_parallel_size"),
])
def test_server_settings_are_checked_without_a_server(server, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _check(**server)


@pytest.mark.skipif(torch.cuda.is_available(), reason="nccl is refused only where there is no GPU")
def test_nccl_is_refused_without_a_gpu():
    with pytest.raises(ConfigError, match="nccl is CUDA-only"):
        _check(url="http://h:1", transport="nccl")


def test_the_grpo_config_validates_server_keys_by_name(tiny_dir):
    from align.config import load_config
    from align.grpo.config import GRPOConfig

    base = [f"model.path={tiny_dir}", "output_dir=/tmp/x", "train_data=[a.jsonl]", "rewards=[{name: exact_answer}]",
            "rollout.engine=vllm_server"]
    with pytest.raises(ConfigError, match=r"rollout\.server\.url"):
        load_config(GRPOConfig, None, base)
    with pytest.raises(ConfigError, match=r"rollout\.server\.bogus"):
        load_config(GRPOConfig, None, base + ["rollout.server.bogus=1"])
    cfg = load_config(GRPOConfig, None, base + ["rollout.server.url=http://10.0.0.2:8000",
                                                "rollout.server.transport=disk"])
    assert cfg.rollout.server.transport == "disk"


def test_server_command_has_the_flags_align_needs():
    cmd, env = vs.server_command("/m", dtype=torch.bfloat16, max_model_len=2048, port=9001,
                                 tensor_parallel_size=8, on_cpu=False, attention_backend=None,
                                 extra_args=("--data-parallel-size", "2"))
    line = " ".join(cmd)
    assert "vllm.entrypoints.openai.api_server --model /m" in line
    assert f"--worker-extension-cls {vs.ALIGN_EXTENSION}" in line and "--logprobs-mode processed_logprobs" in line
    assert "--tensor-parallel-size 8 --distributed-executor-backend mp" in line and "--dtype bfloat16" in line
    assert line.endswith("--data-parallel-size 2") and env == {"VLLM_SERVER_DEV_MODE": "1"}
    cmd, env = vs.server_command("/m", dtype=torch.float32, max_model_len=512, port=1, on_cpu=True,
                                 attention_backend="CPU_MLA")
    assert "--enforce-eager" in cmd and "-rotary_embedding" in " ".join(cmd) and "--attention-backend" in cmd
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    import importlib

    module, _, cls = vs.ALIGN_EXTENSION.rpartition(".")
    assert getattr(importlib.import_module(module), cls) is vs.WeightReceiver


def test_suspect_names_the_first_module_that_differs():
    same = [[1.0, 2.0]]
    trainer = {"model.layers.0.self_attn": same, "model.layers.0.mlp": same, "model.layers.1.self_attn": same,
               "model.layers.1.mlp": [[1.0, 2.0]], "model.layers.10.mlp": same}
    server = dict(trainer) | {"model.layers.1.mlp": [[1.5, 2.0]], "model.layers.10.mlp": [[9.0, 9.0]]}
    classes = {"model.layers.1.mlp": "DeepseekV2MoE"}
    msg = vs._suspect(trainer, server, classes, 1e-3)
    assert msg.startswith("model.layers.1.mlp (DeepseekV2MoE in vLLM)")
    assert "no single layer" in vs._suspect(trainer, trainer, classes, 1e-3)
    assert vs.probed_modules(["model.layers.10.mlp", "model.layers.2.self_attn", "model.layers.2.mlp",
                              "model.layers.2.mlp.experts", "lm_head"]) == [
        "model.layers.2.self_attn", "model.layers.2.mlp", "model.layers.10.mlp"]


class _Tok:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_completions_answers_fill_rollouts_in_group_order_with_routes():
    eng = vs.VLLMServerEngine.__new__(vs.VLLMServerEngine)
    eng.tokenizer, eng.record_routes = _Tok(), True
    eng.client = vs.ServerClient("http://h:1", 1)

    def routes(n):
        buf = io.BytesIO()
        np.save(buf, np.full((n, 2, 1), 3, dtype=np.uint8))
        return base64.b64encode(buf.getvalue()).decode()
    rows = [([5, 6, 7], {"token_ids": [8, 9], "logprobs": {"token_logprobs": [-0.5, -0.25]},
                         "finish_reason": "stop", "routed_experts": routes(4)}),
            ([5], {"token_ids": [4, 4, 4], "logprobs": {"token_logprobs": [-1.0, -2.0, -3.0]},
                   "finish_reason": "length", "routed_experts": routes(3)})]
    r = eng._rollouts(rows, 2)
    assert r.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 5]] and r.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert r.completion_ids.tolist() == [[8, 9, 0], [4, 4, 4]]
    assert r.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert r.sampling_logprobs.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0]]
    assert r.truncated.tolist() == [False, True] and r.completions == ["8 9", "4 4 4"]
    assert r.routes.shape == (2, 6, 2, 1)
    assert r.routes[0, :4].eq(3).all() and r.routes[0, 4:].eq(-1).all()   # the last sampled token: no route
    assert r.routes[1, :2].eq(-1).all() and r.routes[1, 2:5].eq(3).all()  # left padding: no route
    rows[0][1]["routed_experts"] = None
    with pytest.raises(vs.ServerError, match="--enable-return-routed-experts"):
        eng._rollouts(rows, 2)


def test_a_server_that_is_gone_or_silent_is_named_within_the_timeout():
    port = _free_port()
    with pytest.raises(vs.ServerError, match=f"127.0.0.1:{port}.*no answer"):
        vs.ServerClient(f"http://127.0.0.1:{port}", 2).call("GET", "/health")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()                               # accepts connections, never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    t = time.monotonic()
    with pytest.raises(vs.ServerError, match=f"{url}.*the weight push.*no answer"):
        vs.ServerClient(url, 1.5).rpc("align_receive", {"version": 3}, what="the weight push")
    assert time.monotonic() - t < 10
    call = vs.Background(lambda: time.sleep(30))
    with pytest.raises(vs.ServerError, match="did not finish within rollout.server.timeout_s=0.5"):
        call.result(0.5, url, "the weight push for step 3")
    silent.close()


def test_server_error_json_answers_are_reported_with_the_servers_text():
    class Handler(__import__("http.server").server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(500)
            self.end_headers()
            self.wfile.write(json.dumps({"error": "worker 1: out of memory"}).encode())

        def log_message(self, *a):
            pass
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    with pytest.raises(vs.ServerError, match=r"HTTP 500.*out of memory"):
        vs.ServerClient(url, 5).rpc("align_receive", {}, what="the weight push for step 2")
    httpd.shutdown()


def test_answers_that_do_not_match_what_was_sent_stop_the_run():
    eng = vs.VLLMServerEngine.__new__(vs.VLLMServerEngine)
    eng.client, eng.world, eng.version = vs.ServerClient("http://h:1", 1), 2, 7
    good = {"version": 7, "tensors": 10, "bytes": 400}
    eng._check_answers([good, good], (10, 400), "push", 7)
    with pytest.raises(vs.ServerError, match="1 workers answered, 2 joined"):
        eng._check_answers([good], (10, 400), "push", 7)
    with pytest.raises(vs.ServerError, match="version 7 with 10 tensors"):
        eng._check_answers([good, {**good, "version": 6}], (10, 400), "push", 7)
    with pytest.raises(vs.ServerError, match="version 7 with 10 tensors"):
        eng._check_answers([good, {**good, "tensors": 9}], (10, 400), "push", 7)


def test_align_serve_prints_the_server_command_and_doctor_reports_an_unreachable_server(tiny_dir, capsys):
    from align.cli import main

    assert main(["serve", str(tiny_dir), "--print", "--tensor-parallel-size", "2", "--max-model-len", "1024",
                 "--data-parallel-size", "2"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("VLLM_SERVER_DEV_MODE=1 ") and f"--model {tiny_dir}" in line
    assert "--worker-extension-cls align.rollout.server_worker.WeightReceiver" in line
    assert "--max-model-len 1024" in line and line.rstrip().endswith("--data-parallel-size 2")
    assert main(["serve", str(tiny_dir / "missing"), "--print"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["grpo", "--bogus-flag"])  # only serve passes unknown flags on
    port = _free_port()
    assert main(["doctor", "--server", f"http://127.0.0.1:{port}"]) == 0
    assert f"http://127.0.0.1:{port}: not reachable" in capsys.readouterr().out
