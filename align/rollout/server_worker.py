"""Both ends of a weight push to a vLLM server, and the worker extension that receives it (align/rollout/vllm_server.py
is the trainer's side).

Wire format (gloo on CPU, nccl on GPU; torch only, so a trainer needs no vLLM): a process group of its own, the
trainer's rank 0 at group rank 0 hosting the rendezvous store, each server worker at 1 + its vLLM rank. A push is a
series of buckets, each three broadcasts from rank 0: the lengths (header bytes, buffer bytes), a JSON header
[[name, dtype, shape, offset, nbytes], ...] and one flat byte buffer (each tensor at a 16-byte aligned offset); a
(0, 0) length pair ends it. The disk transport writes the same buckets as safetensors files.

`WeightReceiver` runs inside every vLLM worker (`--worker-extension-cls align.rollout.server_worker.WeightReceiver`):
the methods the trainer calls through the server's /collective_rpc, each with one JSON string argument and a JSON
answer (join / leave the group, take a push into the model, the layer probe of the parity diagnosis).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

PROBE_DIMS = 8  # per-layer outputs are compared after one seeded projection to this many dimensions
ALIGNMENT = 16  # bytes: each tensor's offset in a bucket (any dtype's view of the buffer stays aligned)


def weight_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float):
    """A process group of its own (not torch.distributed's default one): `backend` ("gloo" | "nccl") over a TCP
    rendezvous store hosted by rank 0 at host:port. Returns (store, group backend); ops time out after timeout_s."""
    from torch.distributed import PrefixStore, TCPStore

    timeout = datetime.timedelta(seconds=timeout_s)
    store = TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False,
                     use_libuv=True)
    prefix = PrefixStore("align-weights", store)
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        return store, ProcessGroupGloo(prefix, rank, world_size, timeout)
    from torch.distributed import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options._timeout = timeout
    return store, ProcessGroupNCCL(prefix, rank, world_size, options)


def _broadcast(group, tensor: torch.Tensor) -> None:
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    group.broadcast([tensor], opts).wait()


def _buckets(weights, bucket_bytes: int):
    """Pack a (name, tensor) stream into buckets: (header [[name, dtype, shape, offset, nbytes], ...], flat uint8
    buffer) of about bucket_bytes each (a larger tensor is a bucket of its own)."""
    header, parts, size = [], [], 0
    for name, t in weights:
        t = t.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)
        if parts and size + raw.numel() > bucket_bytes:
            yield header, torch.cat(parts)
            header, parts, size = [], [], 0
        header.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), size, raw.numel()])
        parts.append(raw)
        pad = -raw.numel() % ALIGNMENT
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=t.device))
        size += raw.numel() + pad
    if parts:
        yield header, torch.cat(parts)


def _unpack(header: list, buffer: torch.Tensor):
    for name, dtype, shape, offset, nbytes in header:
        yield name, buffer[offset:offset + nbytes].view(getattr(torch, dtype)).reshape(shape)


def send_weights(group, weights, bucket_bytes: int, device) -> tuple[int, int]:
    """Group rank 0's side of a push: every bucket as (lengths, header, buffer), then (0, 0). Returns (tensors,
    bytes) sent."""
    tensors = sent = 0
    for header, buffer in _buckets(weights, bucket_bytes):
        raw = json.dumps(header).encode()
        _broadcast(group, torch.tensor([len(raw), buffer.numel()], dtype=torch.int64, device=device))
        _broadcast(group, torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device))
        _broadcast(group, buffer.to(device))
        tensors, sent = tensors + len(header), sent + sum(h[4] for h in header)
    _broadcast(group, torch.zeros(2, dtype=torch.int64, device=device))
    return tensors, sent


def receive_weights(group, device, counts: dict):
    """A worker's side of `send_weights`: the (name, tensor) stream, counted into `counts`."""
    while True:
        lengths = torch.empty(2, dtype=torch.int64, device=device)
        _broadcast(group, lengths)
        n_header, n_buffer = lengths.tolist()
        if n_header == 0:
            return
        raw = torch.empty(n_header, dtype=torch.uint8, device=device)
        _broadcast(group, raw)
        buffer = torch.empty(n_buffer, dtype=torch.uint8, device=device)
        _broadcast(group, buffer)
        header = json.loads(bytes(raw.cpu().tolist()))
        counts["tensors"] += len(header)
        counts["bytes"] += sum(h[4] for h in header)
        yield from _unpack(header, buffer)


def _read_dir(path: str, counts: dict):
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                t = st.get_tensor(name)
                counts["tensors"] += 1
                counts["bytes"] += t.numel() * t.element_size()
                yield name, t


# -- the server side: a worker extension (runs inside each vLLM worker) ---------------------------------------------

def _projection(width: int, device) -> torch.Tensor:
    return torch.randn(width, PROBE_DIMS, generator=torch.Generator().manual_seed(0)).to(device)   # [H, 8]


def probed_modules(names: list[str]) -> list[str]:
    """The modules whose outputs the parity diagnosis compares, in forward order: each decoder layer's attention and
    MLP / MoE (the same names in transformers' and vLLM's DeepSeek-V2)."""
    import re

    layer = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)$")
    found = [(int(m[1]), m[2] != "self_attn", name) for name in names if (m := layer.match(name))]
    return [name for *_, name in sorted(found)]


class WeightReceiver:
    """vLLM worker extension (`--worker-extension-cls align.rollout.vllm_server.WeightReceiver`): the methods the
    trainer calls through /collective_rpc, each with one JSON string argument and a JSON answer."""

    def align_info(self, _: str = "{}") -> dict:
        import vllm

        return {"rank": self.rank, "vllm": vllm.__version__, "device": str(self.device), "extension": True,
                "joined": getattr(self, "_align_group", None) is not None}

    def align_join(self, args: str) -> dict:
        """Join the trainer's weight group (replacing an earlier one)."""
        a = json.loads(args)
        self.align_leave()
        self._align_store, self._align_group = weight_group(a["host"], a["port"], 1 + self.rank, a["world_size"],
                                                            a["backend"], a["timeout_s"])
        self._align_version = a.get("version", 0)
        return {"rank": self.rank, "group_rank": 1 + self.rank}

    def align_leave(self, _: str = "{}") -> dict:
        self._align_group = self._align_store = None
        return {"rank": self.rank}

    def align_receive(self, args: str) -> dict:
        """Take one push (from the group, or from files under `path`) into the model; answer what arrived."""
        from .vllm import _reload_weights

        a = json.loads(args)
        counts = {"tensors": 0, "bytes": 0}
        if a.get("path"):
            weights = _read_dir(a["path"], counts)
        else:
            if getattr(self, "_align_group", None) is None:
                raise RuntimeError("align_receive: this worker has not joined a weight group (align_join)")
            device = self.device if self._align_group.name() == "nccl" else torch.device("cpu")
            weights = receive_weights(self._align_group, device, counts)
        refreshed = _reload_weights(self, weights, refresh_experts=a.get("refresh_experts", True))
        self._align_version = a["version"]
        return {"rank": self.rank, "version": a["version"], **counts, "experts_refreshed": refreshed}

    def align_probe_arm(self, args: str) -> dict:
        """Record the probed modules' outputs on the next forward of exactly `tokens` tokens (projected)."""
        tokens = json.loads(args)["tokens"]
        model = self.model_runner.get_model()
        modules = dict(model.named_modules())
        self._align_probe, self._align_hooks = {}, []
        for name in probed_modules(list(modules)):
            def hook(module, inputs, output, name=name):
                out = output[0] if isinstance(output, tuple) else output
                if name not in self._align_probe and out.dim() == 2 and out.shape[0] == tokens:
                    self._align_probe[name] = (out.float() @ _projection(out.shape[-1], out.device)).tolist()
            self._align_hooks.append(modules[name].register_forward_hook(hook))
        return {"rank": self.rank, "armed": len(self._align_hooks)}

    def align_probe_collect(self, _: str = "{}") -> dict:
        for h in getattr(self, "_align_hooks", []):
            h.remove()
        self._align_hooks = []
        model = self.model_runner.get_model()
        classes = {name: type(m).__name__ for name, m in model.named_modules()}
        out = getattr(self, "_align_probe", {})
        return {"rank": self.rank, "outputs": out, "classes": {n: classes[n] for n in out}}
