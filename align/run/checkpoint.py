"""Atomic checkpoints: write everything into a temporary sibling directory, fsync, then rename into place.

A reader (or a resumed run) therefore sees either the previous complete checkpoint or the new complete one, never a
half-written directory. Training checkpoints live in `OUTPUT/checkpoints/step-NNNNNNN/`; each is an ordinary HF
directory (the full model, or only the adapter with LoRA) plus `trainer_state.pt` (optimizer, scheduler, RNG,
data position) and `state.json` (step, metrics, config).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import AlignError, CheckpointError, StorageError
from .finite import nonfinite_tensor
from .storage import guarded_write, tensor_bytes, tree_bytes

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TRAINER_STATE = "trainer_state.pt"
CHECKSUMS = "checksums.json"




def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(directory: Path) -> None:
    """sha256 and size of every file in `directory` (written last, inside the temporary directory)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def verify_checkpoint(ckpt: Path) -> None:
    """Raise CheckpointError unless every file matches its checksum and the weights are finite."""
    sums_file = ckpt / CHECKSUMS
    if not sums_file.is_file():
        raise CheckpointError(f"{ckpt}: no {CHECKSUMS} (incomplete, or written by an align without checksums)")
    try:
        sums = json.loads(sums_file.read_text())
    except ValueError:
        raise CheckpointError(f"{ckpt}/{CHECKSUMS}: unreadable") from None
    for name, want in sums.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != want["bytes"] or _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path}: contents differ from the checksum written with it (truncated or "
                                  "corrupt)")
    for path in sorted(ckpt.glob("*.safetensors")):
        bad = nonfinite_tensor(_load_safetensors(path))
        if bad:
            raise CheckpointError(f"{path}: tensor {bad} holds NaN or inf")


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _ended(pid: str) -> bool:
    """Whether the process that named a temporary file `.NAME.tmp-PID` has ended (or is this one, which is not
    writing it now: the run claims its directory before it writes)."""
    from .lock import pid_alive

    return int(pid) == os.getpid() or not pid_alive(int(pid))


def clean_leftovers(output_dir: str | Path) -> list[Path]:
    """Remove what a killed run left (align's own names only): temporary directories (`.NAME.tmp-PID`,
    `.NAME.old-PID`), and temporary files (a kill inside `atomic_write_text`) whose process has ended; returns what
    was removed. Called with the directory locked (align/run/lock.py)."""
    removed = []
    for parent in (Path(output_dir), Path(output_dir) / CHECKPOINTS):
        if parent.is_dir():
            for p in parent.iterdir():
                if not (p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)):
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
                elif p.is_file() and p.name.rpartition("-")[2].isdigit() and _ended(p.name.rpartition("-")[2]):
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `final` in one rename, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file atomically (write a temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a state file), oldest first. Leftover temporary directories are ignored."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies (checksums, finite weights); a newer one that does not is reported by
    name and passed over."""
    for ck in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(ck)
            return ck
        except CheckpointError as e:
            print(f"warning: checkpoint not used: {e}", flush=True)
    return None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all). Called right after a checkpoint
    was written, which holds only finite numbers (a non-finite one is refused before it is written) and is fsynced:
    the newest is one that verifies, and it is kept."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_training_checkpoint(accelerator, model, tokenizer, output_dir: str | Path, step: int, optimizer,
                             scheduler, state: dict, keep_last: int = 2) -> Path | None:
    """Write `checkpoints/step-N/` atomically: HF model dir (adapter only with LoRA), tokenizer, trainer state."""
    import random

    import numpy as np
    import torch

    final = checkpoint_path(output_dir, step)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)

    def write() -> None:
        bad = nonfinite_tensor(state_dict) or nonfinite_tensor(optimizer.state_dict()["state"])
        if bad:
            raise CheckpointError(f"step {step}: {bad} holds NaN or inf; not saved (the previous checkpoint stays)")
        needed = checkpoint_bytes(output_dir, accelerator.unwrap_model(model), state_dict, optimizer)
        with guarded_write(final, output_dir, needed, f"checkpoint of step {step}",
                           lambda: _after_failed_save(final, output_dir)), atomic_dir(final) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            from ..faults import fault_point

            fault_point("checkpoint", step)  # tests: die with the model written, trainer state not yet
            rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
                       tmp / TRAINER_STATE)
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1, default=str))
            write_checksums(tmp)
        prune_checkpoints(output_dir, keep_last)
    on_main(accelerator, write)
    return final


def on_main(accelerator, work: Callable[[], None]) -> None:
    """`work()` on the main process, a collective: a refusal there (an AlignError: a full disk, a non-finite state,
    a run directory gone) is raised on every process, so none waits in the next collective for a main process that
    stopped."""
    failed: list = [None]
    error = None
    if accelerator.is_main_process:
        try:
            work()
        except AlignError as e:
            error, failed = e, [(isinstance(e, StorageError), str(e))]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(failed)
    if error is not None:
        raise error
    if failed[0] is not None:
        storage, message = failed[0]
        raise (StorageError if storage else CheckpointError)(message)


def checkpoint_bytes(output_dir: str | Path, inner, state_dict: dict, optimizer) -> int:
    """About the bytes a checkpoint of this state takes: the size of the run's newest checkpoint (the same state a
    step earlier), or, before the first, the weights save_pretrained writes (only the trainable adapter under LoRA)
    and the optimizer state."""
    held = list_checkpoints(output_dir)
    if held:
        return tree_bytes(held[-1])
    if hasattr(inner, "peft_config"):
        weights = sum(p.numel() * p.element_size() for p in inner.parameters() if p.requires_grad)
    else:
        weights = tensor_bytes(state_dict)
    return weights + tensor_bytes(optimizer.state_dict()["state"])


def _after_failed_save(target: Path, output_dir: str | Path) -> str:
    """What a failed write of `target` (a checkpoint or final/) left, and what the same command does next."""
    partial = target.parent / f".{target.name}.tmp-{os.getpid()}"
    left = (f"its partial files ({partial}) are removed by the next run" if partial.exists() else
            "its partial files were removed")
    held = list_checkpoints(output_dir)
    if not held:
        return (f"{left.capitalize()}; no checkpoint of this run was saved yet, so once the disk is fixed the same "
                "command starts the run over (its logged steps are replaced, not repeated)")
    return (f"{left.capitalize()}; checkpoint {held[-1]} stays the newest. Once the disk is fixed (free space, or "
            f"fewer checkpoints kept: keep_last), the same command resumes from step {read_state(held[-1])['step']}")


def load_training_state(ckpt: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG from a checkpoint; returns its state.json."""
    import random

    import numpy as np
    import torch

    blob = torch.load(ckpt / TRAINER_STATE, weights_only=False, map_location="cpu")
    bad = nonfinite_tensor(blob["optimizer"].get("state", {}))
    if bad:
        raise CheckpointError(f"{ckpt / TRAINER_STATE}: optimizer state {bad} holds NaN or inf")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    rng = blob["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_state(ckpt)


MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")


def _base_model_ref(name: str | None) -> tuple[str | None, str | None]:
    """(base_model_name_or_path, revision) for an adapter's config: a hub snapshot directory
    (`.../models--owner--name/snapshots/<sha>`, how `hub.resolve_model` hands hub models to transformers) as its hub
    id and commit, any other existing directory as an absolute path, anything else (a hub id) as it is."""
    if not name:
        return name, None
    path = Path(name).expanduser()
    if not path.is_dir():
        return name, None
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/"), path.name
    return str(path), None


def save_portable_adapter(peft_model, out: Path, state_dict=None) -> None:
    """Save the LoRA adapter of `peft_model` so that plain `PeftModel.from_pretrained(base, out)` rebuilds exactly
    the adapted model align trained.

    peft (0.21.x, with transformers v5) rewrites, for a DeepSeek-V2 base, every `target_modules` entry equal to or
    ending in `gate_proj` / `up_proj` / `down_proj` — a regex is first resolved to those leaf names — onto the fused
    routed-expert parameters (`peft/utils/transformers_weight_conversion.py`, `_convert_peft_config_moe`, called from
    `BaseTuner.inject_adapter` on every load); the dense MLP and the shared experts then get no LoRA and their
    saved weights are dropped without an error. That conversion only reads `target_modules`, so the config written
    here names the adapted modules one by one: attention projections in `target_modules`, the dense-MLP / shared-
    expert projections as `target_parameters` (`<module>.weight`: peft wraps the Linear's weight with the same
    lora_A [r, in] / lora_B [out, r] and the same scaling, and the saved keys stay the standard
    `base_model.model.<module>.lora_A.weight`), fused routed-expert targets (`lora.experts`) as they were.
    `lora_dropout` is written as 0 when parameters are targeted (peft refuses dropout there; it is training-only).
    `base_model_name_or_path`: absolute, or the hub id with `revision` the commit (`_base_model_ref`).
    """
    from peft.tuners.lora import LoraLayer, ParamWrapper

    peft_model.save_pretrained(out, state_dict=state_dict)
    cfg_file = out / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    modules, params = [], list(cfg.get("target_parameters") or [])
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            if name.rsplit(".", 1)[-1] in MLP_LEAVES:
                params.append(f"{name}.weight")
            else:
                modules.append(name)
    cfg["target_modules"] = modules or None
    cfg["target_parameters"] = params or None
    if params:
        cfg["lora_dropout"] = 0.0
    old_base = cfg.get("base_model_name_or_path")
    base, revision = _base_model_ref(old_base)
    cfg["base_model_name_or_path"] = base
    if revision:
        cfg["revision"] = revision
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    card = out / "README.md"
    if base != old_base and old_base and card.is_file():  # peft's model card names the base model too
        card.write_text(card.read_text().replace(f"base_model: {old_base}\n", f"base_model: {base}\n")
                        .replace(f"base_model:adapter:{old_base}\n", f"base_model:adapter:{base}\n"))


def export_final(accelerator, model, tokenizer, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the stage's final model as an ordinary HF directory (atomically).

    With LoRA the directory holds the merged full model, so the next stage and any loader (vLLM too) take it as is,
    and the adapter alone in `adapter/`, in the form plain peft loads exactly (`save_portable_adapter`). `dtype`:
    the full model's floating-point tensors saved in that dtype (the compute dtype of a mixed-precision run, whose
    fp32 master weights are twice the size).
    """
    out = Path(out)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if dtype is not None and state_dict is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}

    def write() -> None:
        inner = accelerator.unwrap_model(model)
        needed = tensor_bytes(state_dict)  # under LoRA the base and adapter tensors: about the merged model + adapter
        with guarded_write(out, out.parent, needed, f"final model {out}",
                           lambda: _after_failed_save(out, out.parent)), atomic_dir(out) as tmp:
            if hasattr(inner, "merge_and_unload"):
                save_portable_adapter(inner, tmp / "adapter", state_dict)
                from ..rollout.weights import merged_state_dict

                # W + ΔW for the adapted tensors only, the rest shared with the model: not a second copy of it
                merged = merged_state_dict(inner)
                inner.get_base_model().save_pretrained(tmp, state_dict=merged, safe_serialization=True)
                del merged
            else:
                inner.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                if dtype is not None:  # config.json names the dtype the tensors are saved in, not the masters'
                    config = json.loads((tmp / "config.json").read_text())
                    config["dtype"] = str(dtype).removeprefix("torch.")
                    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            tokenizer.save_pretrained(tmp)
    on_main(accelerator, write)
    return out
