"""`align quickstart [OUT_DIR] [key=value ...]`: tiny DeepSeek-V2 -> SFT -> GRPO on the bundled data, on CPU.

Reads recipes/quickstart.yaml (bundled with the package). Each stage writes its own directory under OUT_DIR (tiny/,
sft/, grpo/); running the same command again skips finished stages and resumes an interrupted one from its last
checkpoint. Overrides address a stage: `sft.epochs=5`, `grpo.steps=20`.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, merge_dicts, build_config, parse_overrides, read_yaml
from .resources import data_dir, recipes_dir


def _fill(value, data: str):
    if isinstance(value, str):
        return value.replace("{data}", data)
    if isinstance(value, list):
        return [_fill(v, data) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, data) for k, v in value.items()}
    return value


def run_quickstart(out_dir: str = "runs/quickstart", overrides: list[str] | None = None) -> dict:
    from .evaluate import evaluate_arithmetic
    from .grpo.config import GRPOConfig
    from .grpo.loop import train_grpo
    from .sft import SFTConfig, train_sft
    from .tiny import build_tiny

    recipe = recipes_dir() / "quickstart.yaml"
    values, lines = read_yaml(recipe)
    values = _fill(merge_dicts(values, parse_overrides(overrides or [])), str(data_dir()))
    unknown = set(values) - {"tiny", "sft", "grpo"}
    if unknown:
        raise ConfigError(f"{recipe}: unknown stage '{sorted(unknown)[0]}'; stages are tiny, sft, grpo")
    out = Path(out_dir)
    tiny_dir, sft_dir, grpo_dir = out / "tiny", out / "sft", out / "grpo"
    source = f"{recipe} + overrides" if overrides else str(recipe)
    sft_values = {**values["sft"], "output_dir": str(sft_dir), "model": {**values["sft"].get("model", {}),
                                                                        "path": str(tiny_dir)}}
    grpo_values = {**values["grpo"], "output_dir": str(grpo_dir),
                   "model": {**values["grpo"].get("model", {}), "path": str(sft_dir / "final")}}
    sft_cfg = build_config(SFTConfig, sft_values, source, {k[4:]: v for k, v in lines.items() if k.startswith("sft.")})
    grpo_cfg = build_config(GRPOConfig, grpo_values, source,
                            {k[5:]: v for k, v in lines.items() if k.startswith("grpo.")})
    tiny = values.get("tiny", {})
    summary: dict = {"out_dir": str(out)}

    if not (tiny_dir / "config.json").is_file():
        summary["tiny"] = build_tiny(tiny_dir, preset=tiny.get("preset", "tiny"), seed=tiny.get("seed", 0))
    if not (sft_dir / "final" / "config.json").is_file():
        summary["sft"] = train_sft(sft_cfg)
    summary["grpo"] = train_grpo(grpo_cfg)
    summary["accuracy"] = {name: evaluate_arithmetic(str(path))["accuracy"]
                           for name, path in (("tiny", tiny_dir), ("sft", sft_dir / "final"),
                                              ("grpo", grpo_dir / "final"))}
    print("quickstart: held-out arithmetic accuracy " +
          ", ".join(f"{k} {v:.1%}" for k, v in summary["accuracy"].items()), flush=True)
    return summary
