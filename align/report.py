"""The run report: RUN_DIR/report.md with the eval figures per stage, what each GRPO stage changed (stage 1's gain,
stage 2's alignment tax), stage 2's reward components on held-out prompts, and PNG plots (matplotlib, Agg) with one
panel per quantity:

  stages.png            after each stage: held-out reasoning accuracy (%, ± one binomial standard error),
                        RM_helpful, RM_safety, refusals of harmful and over-refusals of benign prompts (%)
  accuracy.png          held-out reasoning accuracy during the GRPO stages, step by step, against the SFT model's
  rewards_<stage>.png   each reward component of a GRPO stage per step: the raw points and their rolling mean
  kl_<stage>.png        KL to the reference per step of a GRPO stage (raw and rolling mean)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .run.checkpoint import atomic_write_text
from .run.metrics import read_metrics

PERCENT = {"eval/accuracy", "eval/rule_pass", "eval/refusal_rate", "eval/over_refusal_rate", "eval/pass@1"}
COLUMNS = [("eval/accuracy", "reasoning accuracy"), ("eval/rule_pass", "rule pass"),
           ("eval/helpful_rm", "RM_helpful"), ("eval/safety_rm", "RM_safety"),
           ("eval/refusal_rate", "refusals (harmful)"), ("eval/over_refusal_rate", "over-refusals (benign)")]


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of a share p measured on n items."""
    return math.sqrt(p * (1 - p) / n) if n else math.nan


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def rolling_window(n: int) -> int:
    """Points per rolling mean for a curve of n points: about an eighth of the curve, at least 2."""
    return max(2, round(n / 8))


def _cell(ev: dict, key: str) -> str:
    if key not in ev or ev[key] is None or (isinstance(ev[key], float) and math.isnan(ev[key])):
        return ""
    if key == "eval/accuracy" and ev.get("counts", {}).get("reasoning"):
        p = ev[key]
        return f"{p:.1%} ± {100 * standard_error(p, ev['counts']['reasoning']):.1f}"
    return f"{ev[key]:.1%}" if key in PERCENT else f"{ev[key]:.2f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, width: float = 3.4, height: float = 2.8):
    """A figure of n panels, at most 3 a row (4 as 2 x 2)."""
    plt = _pyplot()
    cols = 2 if n == 4 else min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _save(plt, fig, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_stages(path: Path, evals: list[tuple[str, dict]]) -> None:
    """stages.png: one panel per quantity after each stage (stages without the quantity are left out of it)."""
    panels = [("held-out reasoning accuracy (%)", [("eval/accuracy", "accuracy")]),
              ("RM_helpful (helpful prompts)", [("eval/helpful_rm", "RM_helpful")]),
              ("RM_safety (harmful prompts)", [("eval/safety_rm", "RM_safety")]),
              ("refusals (%)", [("eval/refusal_rate", "of harmful prompts"),
                                ("eval/over_refusal_rate", "of benign prompts (over-refusal)")])]
    panels = [(t, s) for t, s in panels if any(k in ev for k, _ in s for _, ev in evals)]
    if not panels:
        return
    plt, fig, axes = _panels(len(panels))
    names = [n for n, _ in evals]
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            xs = [i for i, (_, ev) in enumerate(evals) if key in ev]
            scale = 100 if key in PERCENT else 1
            ys = [scale * evals[i][1][key] for i in xs]
            err = None
            if key == "eval/accuracy":
                err = [100 * standard_error(evals[i][1][key], evals[i][1].get("counts", {}).get("reasoning", 0))
                       for i in xs]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.0f}" if scale == 100 else f"{y:.1f}", (x, y), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7)
        if title.endswith("(%)"):
            ax.set_ylim(-5, 115)
        else:
            ax.margins(y=0.2)  # room for the value labels
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    _save(plt, fig, path, "held-out evaluation after each stage")


def plot_accuracy(path: Path, curves: list[tuple[str, list[int], list[float]]], baseline: tuple[str, float] | None):
    """accuracy.png: held-out accuracy (%) during each GRPO stage, the stages one after another on the x axis."""
    plt, fig, (ax,) = _panels(1, width=7, height=3.4)
    offset = 0
    for name, steps, accs in curves:
        ax.plot([offset + s for s in steps], [100 * a for a in accs], marker="o", label=name)
        offset += max(steps)
        ax.axvline(offset, color="grey", lw=0.8, ls=":")
    if baseline:
        ax.axhline(100 * baseline[1], color="black", lw=1, ls="--", label=baseline[0])
    ax.set_xlabel("GRPO step (stages in order)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path, "held-out reasoning accuracy during the GRPO stages (each stage's eval_data)")


def plot_curves(path: Path, curves: dict[str, tuple[list, list]], title: str) -> None:
    """One panel per curve: the raw points and their rolling mean."""
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return
    plt, fig, axes = _panels(len(curves))
    for ax, (label, (x, y)) in zip(axes, curves.items()):
        w = rolling_window(len(y))
        ax.plot(x, y, ".", alpha=0.35, color="tab:blue", label="per step")
        ax.plot(x, rolling_mean(y, w), color="tab:red", lw=2, label=f"rolling mean ({w} steps)")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path, title)


def _reward_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r if k.startswith("reward/")}
    comps = sorted(k for k in keys if not k.endswith(("_std", "_applies", "_frac")) and k.count("/") == 1
                   and k not in ("reward/skipped_groups", "reward/total", "reward/weighted"))
    total = "reward/weighted" if "reward/weighted" in keys else "reward/total"  # normalize mode: total is ~0
    return comps + ([total] if total in keys and len(comps) > 1 else [])


def _accuracy(ev: dict) -> float | None:
    a = ev.get("eval/accuracy")
    return None if a is None or math.isnan(a) else a


def change_lines(evals: list[tuple[str, str, dict]]) -> list[str]:
    """One line per GRPO stage: held-out accuracy before -> after it; the last of two or more is the alignment tax.
    evals: (stage, kind, eval figures) in run order."""
    grpo = [i for i, (_, kind, _) in enumerate(evals) if kind == "grpo"]
    out = []
    for n, i in enumerate(grpo):
        before, after = _accuracy(evals[i - 1][2]) if i else None, _accuracy(evals[i][2])
        if before is None or after is None:
            continue
        what = "alignment tax of" if n == len(grpo) - 1 and n > 0 else "gain of"
        out.append(f"{what} GRPO stage {n + 1} (`{evals[i][0]}`): held-out reasoning accuracy {before:.1%} -> "
                   f"{after:.1%} ({100 * (after - before):+.1f} points)")
    return out


def rm_check_lines(evals: list[tuple[str, str, dict]]) -> list[str]:
    """Whether each reward model scores the random-weight model's answers below the SFT model's."""
    tiny = next((ev for _, kind, ev in evals if kind == "tiny"), None)
    sft = next((ev for _, kind, ev in evals if kind == "sft"), None)
    out = []
    for key, name in (("eval/helpful_rm", "RM_helpful"), ("eval/safety_rm", "RM_safety")):
        if tiny and sft and key in tiny and key in sft:
            verdict = "below" if tiny[key] < sft[key] else "NOT below (the RM rewards junk)"
            out.append(f"{name}: the random-weight model's answers score {tiny[key]:.2f}, {verdict} the SFT "
                       f"model's {sft[key]:.2f}")
    return out


def rm_ranking_lines(rms: list[tuple[str, str, dict]]) -> list[str]:
    """The table of each reward model's held-out pairs ranked right, by the kind of rejected side."""
    rms = [(name, ev) for name, _, ev in rms if ev.get("pair_accuracy_by_kind")]
    if not rms:
        return []
    kinds = list(dict.fromkeys(k for _, ev in rms for k in ev["pair_accuracy_by_kind"]))
    lines = ["", "## Reward models on held-out pairs", "",
             "Share of held-out pairs with r(chosen) > r(rejected), by what the rejected side is (pairs in brackets).",
             "", "| reward model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, ev in rms:
        acc, n = ev["pair_accuracy_by_kind"], ev["pairs_by_kind"]
        lines.append(f"| {name} | " + " | ".join(f"{acc[k]:.0%} ({n[k]})" if k in acc else "" for k in kinds) + " |")
    return lines


def components_lines(evals: list[tuple[str, str, dict]]) -> list[str]:
    """The table of stage 2's reward components (eval.json `reward_components`) after each stage."""
    rows = [(name, ev["reward_components"]) for name, _, ev in evals if ev.get("reward_components")]
    if not rows:
        return []
    first = rows[0][1]
    labels = list(first["weights"])
    formula = " + ".join(f"{w:g}·{k}" for k, w in first["weights"].items())
    lines = ["", f"## Stage 2 (`{first['stage']}`) reward components on held-out prompts", "",
             f"Mean of each component of r = {formula} over the greedy answers to the {first['n']} held-out helpful "
             f"and harmful prompts (raw scores; the weighted sum as in reward_mode=sum).", "",
             "| after stage | " + " | ".join(labels) + " | weighted sum |", "|---|" + "---|" * (len(labels) + 1)]
    for name, comp in rows:
        cells = [f"{comp['means'][k]:.2f}" if comp["means"].get(k) is not None else "" for k in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {comp['total']:.2f} |")
    return lines


def _grpo_section(run_dir: Path, name: str, rows: list[dict]) -> list[str]:
    lines = ["", f"## GRPO stage `{name}`", ""]
    curves = {k[7:]: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in _reward_keys(rows)}
    plot_curves(run_dir / f"rewards_{name}.png", curves, f"{name}: reward per step (rollout means)")
    kl = ([r["step"] for r in rows if "loss/kl" in r], [r["loss/kl"] for r in rows if "loss/kl" in r])
    plot_curves(run_dir / f"kl_{name}.png", {"k3 KL to the reference": kl}, f"{name}: KL to the reference")
    acc = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    if acc:
        lines += ["held-out accuracy during the stage: " + ", ".join(f"step {s}: {a:.1%}" for s, a in acc), ""]
    steps = [r for r in rows if "perf/step_s" in r]
    if steps:
        lines += [f"{len(steps)} steps, {sum(r['perf/step_s'] for r in steps) / len(steps):.2f} s per step", ""]
    tool_keys = ("tools/calls", "tools/used_frac", "tools/failures", "tools/turns")
    tools = [r for r in rows if "tools/calls" in r]
    if tools:  # multi-turn rollouts: did the policy call its tools more as it trained?
        head, tail = tools[:max(len(tools) // 5, 1)], tools[-max(len(tools) // 5, 1):]
        mean = lambda rs, k: sum(r.get(k, 0.0) for r in rs) / len(rs)  # noqa: E731
        lines += ["tools per completion, first fifth of the steps -> last fifth: " + ", ".join(
            f"{k[6:]} {mean(head, k):.2f} -> {mean(tail, k):.2f}" for k in tool_keys), ""]
        plot_curves(run_dir / f"tools_{name}.png", {k[6:]: ([r["step"] for r in tools], [r.get(k, 0.0) for r in tools])
                                                    for k in tool_keys}, f"{name}: tool use per completion")
    lines.append(f"![rewards](rewards_{name}.png)")
    if kl[0]:
        lines.append(f"![KL](kl_{name}.png)")
    if tools:
        lines.append(f"![tools](tools_{name}.png)")
    return lines


def write_report(run_dir: Path, stages: list[tuple[str, str]]) -> Path:
    """Write report.md (and its plots) for the stages of a run; returns the report's path."""
    run_dir = Path(run_dir)
    evals, rms = [], []
    for name, kind in stages:
        f = run_dir / name / "eval.json"
        if f.is_file():
            (rms if kind == "rm" else evals).append((name, kind, json.loads(f.read_text())))
    lines = [f"# Run report: {run_dir}", "", "## Held-out evaluation after each stage", "",
             "| stage | kind | " + " | ".join(c for _, c in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {name} | {kind} | " + " | ".join(_cell(ev, k) for k, _ in COLUMNS) + " |" for name, kind, ev in evals]
    n = next((ev["counts"]["reasoning"] for _, _, ev in evals if ev.get("counts", {}).get("reasoning")), None)
    if n:
        lines += ["", f"Reasoning accuracy: greedy answers to {n} held-out problems, ± one binomial standard error."]
    summary = change_lines(evals) + rm_check_lines(evals)
    if summary:
        lines += [""] + [f"- {s}" for s in summary]
    if evals:
        plot_stages(run_dir / "stages.png", [(name, ev) for name, _, ev in evals])
        lines += ["", "![evaluation after each stage](stages.png)"]
    curves = []
    for name, kind in stages:
        rows = [r for r in read_metrics(run_dir / name) if "eval/accuracy" in r] if kind == "grpo" else []
        if rows:
            curves.append((name, [r["step"] for r in rows], [r["eval/accuracy"] for r in rows]))
    if curves:
        # the start line is the first stage's step-0 evaluation: the same problems as the curves (a stage's
        # eval_data), which can be fewer than the end-of-stage evaluation's
        first, steps, accs = curves[0]
        start = (f"{first} at step 0", accs[0]) if steps[0] == 0 else None
        plot_accuracy(run_dir / "accuracy.png", curves, start)
        lines += ["", "![held-out accuracy during the GRPO stages](accuracy.png)"]
    lines += rm_ranking_lines(rms) + components_lines(evals)
    for name, kind in stages:
        rows = read_metrics(run_dir / name)
        if kind == "grpo" and rows:
            lines += _grpo_section(run_dir, name, rows)
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
