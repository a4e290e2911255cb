"""The run report: RUN_DIR/report.md with a table of eval figures per stage and PNG plots (matplotlib, Agg).

  rewards_<stage>.png   reward components per step of each GRPO stage
  kl_<stage>.png        KL to the reference per step of each GRPO stage
  stages.png            held-out accuracy and RM_safety score after each stage
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import atomic_write_text
from .metrics import read_metrics

COLUMNS = [("eval/accuracy", "reasoning accuracy"), ("eval/rule_pass", "rule pass"),
           ("eval/helpful_rm", "RM_helpful"), ("eval/safety_rm", "RM_safety"), ("eval/refusal_rate", "refusals")]


def _plot(path: Path, series: dict[str, tuple[list, list]], title: str, ylabel: str,
          xticks: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label, marker="o" if len(x) < 12 else None)
    ax.set_title(title)
    ax.set_xlabel("stage" if xticks else "step")
    if xticks:
        ax.set_xticks(range(len(xticks)), xticks)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _reward_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r if k.startswith("reward/")}
    return sorted(k for k in keys if not k.endswith(("_std", "_applies", "_frac")) and k.count("/") == 1
                  and k != "reward/skipped_groups")


def write_report(run_dir: Path, stages: list[tuple[str, str]]) -> Path:
    """Write report.md (and its plots) for the stages of a run; returns the report's path."""
    run_dir = Path(run_dir)
    lines = [f"# Run report: {run_dir}", "", "## Held-out evaluation after each stage", "",
             "| stage | kind | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    evals = []
    for name, kind in stages:
        f = run_dir / name / "eval.json"
        if f.is_file():
            ev = json.loads(f.read_text())
            evals.append((name, ev))
            cells = [f"{ev[k]:.3f}" if k in ev else "" for k, _ in COLUMNS]
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    if evals:
        xs = list(range(len(evals)))
        series = {label: (xs, [ev.get(key, float("nan")) for _, ev in evals])
                  for key, label in (("eval/accuracy", "reasoning accuracy"), ("eval/safety_rm", "RM_safety"))
                  if any(key in ev for _, ev in evals)}
        _plot(run_dir / "stages.png", series, "held-out evaluation after each stage", "value",
              xticks=[n for n, _ in evals])
        lines += ["", "![accuracy and safety per stage](stages.png)"]
    for name, kind in stages:
        rows = read_metrics(run_dir / name)
        if kind != "grpo" or not rows:
            continue
        lines += ["", f"## GRPO stage `{name}`", ""]
        keys = _reward_keys(rows)
        series = {k[7:]: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in keys}
        _plot(run_dir / f"rewards_{name}.png", series, f"{name}: reward components", "reward")
        kl = ([r["step"] for r in rows if "loss/kl" in r], [r["loss/kl"] for r in rows if "loss/kl" in r])
        _plot(run_dir / f"kl_{name}.png", {"KL": kl}, f"{name}: KL to the reference", "k3 KL")
        acc = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        if acc:
            lines.append("held-out accuracy during the stage: " + ", ".join(f"step {s}: {a:.1%}" for s, a in acc))
            lines.append("")
        steps = [r for r in rows if "perf/step_s" in r]
        if steps:
            lines.append(f"{len(steps)} steps, {sum(r['perf/step_s'] for r in steps) / len(steps):.2f} s per step")
            lines.append("")
        lines += [f"![rewards](rewards_{name}.png)", f"![KL](kl_{name}.png)"]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
