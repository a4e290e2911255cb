"""`log_completions: N`: what the policy wrote, beside the numbers. Each step, the first N prompts' G completions
with their rewards and advantages go to RUN_DIR/samples.jsonl (one JSON row per completion, TRL's log_completions),
to TensorBoard as text and to Weights & Biases as a table (`samples`, one per logged step) when they are on.
Multi-turn rollouts show the whole conversation (turns and tool answers) and how many tool calls each made;
`sampled` is the share of its tokens the model sampled (the loss mask)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def sample_rows(step: int, prompts: list, rollouts, total: torch.Tensor, components: dict[str, torch.Tensor],
                advantages: torch.Tensor | None, n_prompts: int) -> list[dict]:
    """One row per completion of the step's first `n_prompts` prompts (rows b*G .. b*G+G-1 of prompt b)."""
    G = rollouts.group_size
    num = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 6)  # noqa: E731
    rows = []
    for i in range(min(n_prompts * G, len(rollouts.completions))):
        messages = prompts[i]
        rows.append({
            "step": step, "prompt_index": i // G, "sample": i % G,
            "prompt": messages[-1]["content"] if messages else "",
            "completion": rollouts.completions[i],
            "reward": num(total[i].item()),
            "rewards": {k: num(v[i].item()) for k, v in components.items()},
            "advantage": None if advantages is None else num(advantages[i].item()),
            "tokens": int(rollouts.completion_mask[i].sum()),
            "sampled": round(float(rollouts.loss_mask[i].sum()) / max(int(rollouts.completion_mask[i].sum()), 1), 4),
            "truncated": bool(rollouts.truncated[i]),
        })
    return rows


COLUMNS = ("step", "prompt_index", "sample", "prompt", "completion", "reward", "advantage", "tokens", "sampled",
           "truncated")


def wandb_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """(columns, data) of a W&B table of `rows`: the row's fields, each reward component as `reward/<name>`."""
    components = list(dict.fromkeys(k for r in rows for k in r["rewards"]))
    columns = list(COLUMNS) + [f"reward/{k}" for k in components]
    return columns, [[r[c] for c in COLUMNS] + [r["rewards"].get(k) for k in components] for r in rows]


def write_samples(run_dir: str | Path, rows: list[dict], tensorboard=None, wandb_run=None) -> None:
    """Append `rows` to RUN_DIR/samples.jsonl (and to TensorBoard as one text entry per step, to the W&B run as one
    table per step)."""
    if not rows:
        return
    path = Path(run_dir) / "samples.jsonl"
    with path.open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if tensorboard is not None:
        table = "\n\n".join(f"**prompt {r['prompt_index']} / sample {r['sample']}** (reward {r['reward']}): "
                            f"{r['prompt']}\n\n    {r['completion']}" for r in rows)
        tensorboard.add_text("samples", table, rows[0]["step"])
    if wandb_run is not None:
        import wandb

        columns, data = wandb_table(rows)
        wandb_run.log({"samples": wandb.Table(columns=columns, data=data)}, step=rows[0]["step"])
