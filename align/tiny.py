"""`align tiny OUT_DIR`: a small DeepSeek-V2 (MLA + MoE) with random weights and a tokenizer trained offline.

The directory is an ordinary HF checkpoint: `AutoModelForCausalLM.from_pretrained(OUT_DIR)` and
`AutoTokenizer.from_pretrained(OUT_DIR)` load it with no network. It runs the same transformers code paths as the
236B model (MLA attention, shared + routed experts, top-k routing), only with small widths.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from transformers import DeepseekV2ForCausalLM

from .config import option
from .model.presets import parameter_counts, preset_config
from .model.tokenizer import train_tokenizer
from .resources import data_dir
from .run.checkpoint import atomic_dir


@dataclasses.dataclass
class TinyConfig:
    output_dir: str = option(help="Where the model + tokenizer directory goes.")
    preset: str = option("tiny", "Model preset: tiny (q_proj) or tiny-q-lora (q_a_proj / q_b_proj).")
    seed: int = option(0, "Seed of the random weights.")

    def validate(self) -> None:
        from .config import check_seed, directory_path, require
        from .model.presets import PRESETS

        self.output_dir = directory_path(self.output_dir, "output_dir")
        require(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}", self.preset)
        check_seed(self.seed)


# bundled files added after the tokenizer was fixed: left out of its corpus, so the tiny tokenizer (and every figure
# measured with the tiny model) stays what it was
NOT_IN_CORPUS = ("arith/tools_train.jsonl",)


def corpus_texts(folder: Path | None = None) -> list[str]:
    """Every message of the bundled chat datasets (`messages` rows): the tokenizer's training corpus."""
    folder = folder or data_dir()
    texts = []
    for path in sorted(folder.rglob("*.jsonl")):
        if path.relative_to(folder).as_posix() in NOT_IN_CORPUS:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for m in row.get("messages", []):
                texts.append(("User: " if m["role"] == "user" else "Assistant: ") + m["content"])
    if not texts:
        raise FileNotFoundError(f"no JSONL text found under {folder} to train the tokenizer on")
    return texts


def build_tiny(out_dir: str | Path, preset: str = "tiny", seed: int = 0, vocab_size: int | None = None) -> dict:
    """Build and save the tiny model + tokenizer; returns a summary (parameter counts, vocab size)."""
    from .config import check_writable_dir

    out = Path(out_dir)
    check_writable_dir(out, "output_dir")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    config = preset_config(preset)
    tokenizer = train_tokenizer(corpus_texts(), vocab_size=vocab_size or config.vocab_size)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    total, active = parameter_counts(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"path": str(out), "preset": preset, "total_params": total, "active_params": active,
            "vocab_size": len(tokenizer)}
