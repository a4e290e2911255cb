"""The run report: RUN_DIR/report.md with the eval figures per stage, what each GRPO stage changed (stage 1's gain,
stage 2's alignment tax), stage 2's reward components on held-out prompts, and PNG plots (matplotlib, Agg) with one
panel per quantity:

  stages.png            after each stage: held-out reasoning accuracy (%, ± one binomial standard error),
                        RM_helpful, RM_safety, refusals of harmful and over-refusals of benign prompts (%)
  accuracy.png          held-out reasoning accuracy during the GRPO stages, step by step, against the SFT model's
  rewards_<stage>.png   each reward component of a GRPO stage per step: the raw points and their rolling mean
  kl_<stage>.png        KL to the reference per step of a GRPO stage (raw and rolling mean)

Every stage command (`align sft`, `align rm`, `align grpo`, standalone or in a recipe) also writes OUTPUT/report.md
at its end (`write_stage_report`, from metrics.jsonl): what changed over the run and its plots,

  training.png          SFT: loss (and held-out loss), balance loss, learning rate, gradient norm; RM: Bradley-Terry
                        loss, pair accuracy (train and held-out), margin, learning rate, gradient norm; GRPO: policy
                        loss, KL, entropy, clip fraction, completion length, truncation, zero-std groups, gradient
                        norm, learning rate, held-out accuracy
  rewards.png           GRPO: each reward component and the total per step, with a rolling mean
  tools.png             GRPO with tools: tool calls, use, failures and turns per completion

A panel is drawn only for a quantity the run measured and that changed: one that kept one value throughout (0, or a
constant learning rate) is named in the report with its value instead; a legend names only the series drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .run.checkpoint import atomic_write_text
from .run.metrics import REWARD_COUNTS, read_metrics

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


DPI = 150
TITLE, LABEL, TICK, LEGEND = 11, 10, 9, 8.5  # font sizes (points): legible on a laptop screen at DPI


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, width: float = 4.8, height: float = 3.4):
    """A figure of n panels, at most 3 a row (4 as 2 x 2)."""
    plt = _pyplot()
    cols = 2 if n == 4 else min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes.flat[:n]:
        ax.tick_params(labelsize=TICK)
    return plt, fig, list(axes.flat[:n])


def _save(plt, fig, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=TITLE + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_stages(path: Path, evals: list[tuple[str, dict]]) -> None:
    """stages.png: one panel per quantity after each stage (stages without the quantity are left out of it, and a
    series no stage measured out of the panel and its legend)."""
    panels = [("held-out reasoning accuracy (%)", [("eval/accuracy", "accuracy")]),
              ("RM_helpful (helpful prompts)", [("eval/helpful_rm", "RM_helpful")]),
              ("RM_safety (harmful prompts)", [("eval/safety_rm", "RM_safety")]),
              ("refusals (%)", [("eval/refusal_rate", "of harmful prompts"),
                                ("eval/over_refusal_rate", "of benign prompts (over-refusal)")])]
    panels = [(t, [(k, label) for k, label in s if any(_finite(ev.get(k)) for _, ev in evals)]) for t, s in panels]
    panels = [(t, s) for t, s in panels if s]
    if not panels:
        return
    plt, fig, axes = _panels(len(panels))
    names = [n for n, _ in evals]
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            xs = [i for i, (_, ev) in enumerate(evals) if _finite(ev.get(key))]
            scale = 100 if key in PERCENT else 1
            ys = [scale * evals[i][1][key] for i in xs]
            err = None
            if key == "eval/accuracy":
                err = [100 * standard_error(evals[i][1][key], evals[i][1].get("counts", {}).get("reasoning", 0))
                       for i in xs]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.0f}" if scale == 100 else f"{y:.1f}", (x, y), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=LEGEND)
        if title.endswith("(%)"):
            ax.set_ylim(-5, 115)
        else:
            ax.margins(y=0.2)  # room for the value labels
        ax.set_title(title, fontsize=TITLE)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=TICK)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=LEGEND)
    _save(plt, fig, path, "held-out evaluation after each stage")


def plot_accuracy(path: Path, curves: list[tuple[str, list[int], list[float]]],
                  baseline: tuple[str, float] | None) -> bool:
    """accuracy.png: held-out accuracy (%) during each GRPO stage, the stages one after another on the x axis, on a
    0-100 axis. Not drawn (False) when every value is 0."""
    if not any(a for _, _, accs in curves for a in accs if _finite(a)) and not (baseline and baseline[1]):
        return False
    plt, fig, (ax,) = _panels(1, width=9, height=4.2)
    offset = 0
    for name, steps, accs in curves:
        ax.plot([offset + s for s in steps], [100 * a for a in accs], marker="o", label=name)
        offset += max(steps)
        ax.axvline(offset, color="grey", lw=0.8, ls=":")
    if baseline:
        ax.axhline(100 * baseline[1], color="black", lw=1, ls="--", label=baseline[0])
    ax.set_ylim(-3, 103)
    ax.set_xlabel("GRPO step (stages in order)", fontsize=LABEL)
    ax.set_ylabel("held-out accuracy (%)", fontsize=LABEL)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=LEGEND)
    _save(plt, fig, path, "held-out reasoning accuracy during the GRPO stages (each stage's eval_data)")
    return True


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# A panel to draw: (title, series, y limits or None), a series (legend label, how, steps, values); how: "steps"
# (each step's point under their rolling mean; fewer than ROLLING_FROM steps: the points joined), "evals" (a few
# evaluations, points joined), "line" (a schedule).
PanelData = tuple[str, list[tuple[str, str, list, list]], tuple[float, float] | None]

ROLLING_FROM = 8  # steps from which a per-step series is drawn as faint points under their rolling mean


def plot_panels(path: Path, panels: list[PanelData], title: str) -> tuple[bool, list[tuple[str, float]]]:
    """One panel per quantity; non-finite points are left out, a series with none is not drawn (nor named in the
    legend), and a panel whose every point has one value (0 throughout, a constant learning rate) is not drawn.
    Returns (whether the file was written: not when no panel is left, (title, value) of each flat panel)."""
    kept, flat = [], []
    for name, series, ylim in panels:
        series = [(label, how, *zip(*[(x, y) for x, y in zip(xs, ys) if _finite(y)]))
                  for label, how, xs, ys in series if any(_finite(y) for y in ys)]
        if not series:
            continue
        values = {y for *_, ys in series for y in ys}
        if len(values) == 1:
            flat.append((name, values.pop()))
            continue
        kept.append((name, series, ylim))
    if not kept:
        return False, flat
    plt, fig, axes = _panels(len(kept))
    from matplotlib.ticker import MaxNLocator

    for ax, (name, series, ylim) in zip(axes, kept):
        several = sum(how == "steps" for _, how, _, _ in series) > 1
        for i, (label, how, xs, ys) in enumerate(series):
            color = f"C{i}"
            raw = label if label == "per step" else f"{label}, per step"
            if how == "steps" and len(ys) >= ROLLING_FROM:
                w = rolling_window(len(ys))
                ax.plot(xs, ys, ".", alpha=0.45, color=color, label=raw)
                ax.plot(xs, rolling_mean(list(ys), w), color=color, lw=2,
                        label=f"{label + ': ' if several else ''}rolling mean ({w} steps)")
            elif how == "steps":  # a few steps: the points themselves, joined
                ax.plot(xs, ys, ".-", color=color, lw=1.2, ms=7, label=raw)
            else:
                ax.plot(xs, ys, "o-" if how == "evals" else "-", color=color, lw=1.5, ms=5, label=label)
        if ylim:
            ax.set_ylim(*ylim)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))  # steps: no 1.25
        ax.set_title(name, fontsize=TITLE)
        ax.set_xlabel("step", fontsize=LABEL)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=LEGEND)
    _save(plt, fig, path, title)
    return True, flat


def flat_line(flat: list[tuple[str, float]]) -> list[str]:
    """The report's line for the quantities `plot_panels` did not draw, each with its one value."""
    return ["the same at every step (not plotted): " + ", ".join(f"{name} {v:.4g}" for name, v in flat), ""] if (
        flat) else []


def plot_curves(path: Path, curves: dict[str, tuple[list, list]], title: str) -> tuple[bool, list[tuple[str, float]]]:
    """One panel per curve: the raw points and their rolling mean (as `plot_panels`)."""
    return plot_panels(path, [(label, [("per step", "steps", x, y)], None) for label, (x, y) in curves.items()],
                       title)


NOT_COMPONENTS = (*REWARD_COUNTS, "reward/total", "reward/weighted")


def _reward_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r if k.startswith("reward/")}
    comps = sorted(k for k in keys if not k.endswith(("_std", "_applies", "_frac")) and k.count("/") == 1
                   and k not in NOT_COMPONENTS)
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


TOOL_KEYS = ("tools/calls", "tools/used_frac", "tools/failures", "tools/turns")


def _grpo_section(run_dir: Path, name: str, rows: list[dict]) -> list[str]:
    lines = ["", f"## GRPO stage `{name}`", ""]
    if (run_dir / name / "report.md").is_file():
        lines += [f"The stage's own report, with its loss, KL, entropy, clip fraction and length plots: "
                  f"[{name}/report.md]({name}/report.md)", ""]
    curves = {k[7:]: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in _reward_keys(rows)}
    rewards, flat = plot_curves(run_dir / f"rewards_{name}.png", curves, f"{name}: reward per step (rollout means)")
    kl = ([r["step"] for r in rows if "loss/kl" in r], [r["loss/kl"] for r in rows if "loss/kl" in r])
    has_kl, flat_kl = plot_curves(run_dir / f"kl_{name}.png", {"k3 KL to the reference": kl},
                                  f"{name}: KL to the reference")
    flat += flat_kl
    acc = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    if acc:
        lines += ["held-out accuracy during the stage: " + ", ".join(f"step {s}: {a:.1%}" for s, a in acc), ""]
    steps = [r for r in rows if "perf/step_s" in r]
    if steps:
        lines += [f"{len(steps)} steps, {sum(r['perf/step_s'] for r in steps) / len(steps):.2f} s per step", ""]
    tools = [r for r in rows if "tools/calls" in r]
    has_tools = False
    if tools:  # multi-turn rollouts: did the policy call its tools more as it trained?
        head, tail = tools[:max(len(tools) // 5, 1)], tools[-max(len(tools) // 5, 1):]
        mean = lambda rs, k: sum(r.get(k, 0.0) for r in rs) / len(rs)  # noqa: E731
        lines += ["tools per completion, first fifth of the steps -> last fifth: " + ", ".join(
            f"{k[6:]} {mean(head, k):.2f} -> {mean(tail, k):.2f}" for k in TOOL_KEYS), ""]
        has_tools, flat_tools = plot_curves(
            run_dir / f"tools_{name}.png", {k[6:]: ([r["step"] for r in tools], [r.get(k, 0.0) for r in tools])
                                            for k in TOOL_KEYS}, f"{name}: tool use per completion")
        flat += [(f"tools/{t}", v) for t, v in flat_tools]
    lines += flat_line(flat)
    lines += [f"![{what}]({what}_{name}.png)" for what, drawn in (("rewards", rewards), ("kl", has_kl),
                                                                    ("tools", has_tools)) if drawn]
    return lines


# What a stage's training.png shows: (panel title, [(metrics key, legend label, how, scale)], y limits or None);
# how as in `plot_panels`; scale 100 shows a share in %.
HELD_OUT_PERCENT = (-3, 103)
STAGE_PANELS = {
    "sft": [("loss: NLL per assistant token", [("loss/sft", "train", "steps", 1),
                                                ("eval/loss", "held-out", "evals", 1)], None),
            ("expert balance loss", [("loss/balance", "per step", "steps", 1)], None),
            ("learning rate", [("train/lr", "schedule", "line", 1)], None),
            ("gradient norm (before clipping)", [("train/grad_norm", "per step", "steps", 1)], None)],
    "rm": [("Bradley-Terry loss", [("loss/bt", "per step", "steps", 1)], None),
           ("pair accuracy (%): r(chosen) > r(rejected)", [("rm/train_accuracy", "train batch", "steps", 100),
                                                           ("eval/pair_accuracy", "held-out", "evals", 100)],
            HELD_OUT_PERCENT),
           ("margin r(chosen) - r(rejected)", [("rm/margin", "per step", "steps", 1)], None),
           ("learning rate", [("train/lr", "schedule", "line", 1)], None),
           ("gradient norm (before clipping)", [("train/grad_norm", "per step", "steps", 1)], None)],
    "grpo": [("policy loss", [("loss/policy", "per step", "steps", 1)], None),
             ("KL to the reference (k3, per token)", [("loss/kl", "per step", "steps", 1)], None),
             ("entropy (nats per token)", [("policy/entropy", "per step", "steps", 1)], None),
             ("clip fraction (% of tokens)", [("loss/clip_frac", "per step", "steps", 100)], None),
             ("completion length (sampled tokens)", [("rollout/completion_len", "per step", "steps", 1)], None),
             ("truncated completions (%)", [("rollout/truncated_frac", "per step", "steps", 100)], None),
             ("groups with zero reward spread (%)", [("reward/zero_std_frac", "per step", "steps", 100)], None),
             ("gradient norm (before clipping)", [("train/grad_norm", "per step", "steps", 1)], None),
             ("learning rate", [("train/lr", "schedule", "line", 1)], None),
             ("held-out accuracy (%)", [("eval/accuracy", "held-out", "evals", 100)], HELD_OUT_PERCENT)],
}
HELD_OUT = {"sft": ("eval/loss", "held-out loss", "{:.4f}"), "rm": ("eval/pair_accuracy", "held-out pair accuracy",
                                                                    "{:.1%}"),
            "grpo": ("eval/accuracy", "held-out accuracy", "{:.1%}")}


def _series(rows: list[dict], key: str, scale: float) -> tuple[list, list]:
    """(steps, values x scale) of the rows that have `key`."""
    got = [(r["step"], r[key]) for r in rows if key in r]
    return [s for s, _ in got], [scale * v if _finite(v) else math.nan for _, v in got]


def _fifths(rows: list[dict], panels: list[tuple]) -> list[str]:
    """The table of each per-step quantity's mean over the first and the last fifth of the steps."""
    lines = []
    for title, series, _ in panels:
        for key, label, how, scale in series:
            xs, ys = _series(rows, key, scale)
            ys = [y for y in ys if _finite(y)]
            if how != "steps" or len(set(ys)) < 2:  # one value throughout: named in the report's flat line
                continue
            n = max(len(ys) // 5, 1)
            name = title if label == "per step" else f"{title} ({label})"
            lines.append(f"| {name} | {sum(ys[:n]) / n:.4g} | {sum(ys[-n:]) / n:.4g} |")
    if not lines:
        return []
    return ["| per step (mean) | first fifth of the steps | last fifth |", "|---|---|---|"] + lines + [""]


def write_stage_report(output_dir: str | Path, kind: str) -> Path:
    """OUTPUT/report.md and its plots for one `align sft` / `rm` / `grpo` run, from its metrics.jsonl: the steps,
    the held-out figure at each evaluation, each per-step quantity's first and last fifth, and training.png
    (rewards.png and tools.png for GRPO). Returns the report's path."""
    out = Path(output_dir)
    rows = read_metrics(out)
    trained = [r["step"] for r in rows if r["step"] > 0]
    lines = [f"# `align {kind}` report: {out}", ""]
    if trained:
        lines += [f"{len(trained)} steps logged (steps {min(trained)} to {max(trained)}), from metrics.jsonl.", ""]
    key, what, fmt = HELD_OUT[kind]
    evals = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
    if evals:
        lines += [f"{what}: " + ", ".join(f"step {s}: {fmt.format(v)}" for s, v in evals), ""]
    figures = {"training": (STAGE_PANELS[kind], f"align {kind}: {out.name}")}
    if kind == "grpo":
        figures["rewards"] = ([(f"reward: {k[7:]}", [(k, "per step", "steps", 1)], None) for k in _reward_keys(rows)],
                              f"align grpo: {out.name}: reward per step (rollout means)")
        if any("tools/calls" in r for r in rows):
            figures["tools"] = ([(f"tools: {k[6:]}", [(k, "per step", "steps", 1)], None) for k in TOOL_KEYS],
                                f"align grpo: {out.name}: tool use per completion")
    drawn, flat = [], []
    for name, (spec, title) in figures.items():
        panels = [(t, [(label, how, *_series(rows, k, scale)) for k, label, how, scale in series], ylim)
                  for t, series, ylim in spec]
        written, z = plot_panels(out / f"{name}.png", panels, title)
        drawn += [name] if written else []
        flat += z
    lines += _fifths(rows, [panel for spec, _ in figures.values() for panel in spec])
    lines += flat_line(flat)
    lines += [f"![{f}]({f}.png)" for f in drawn]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


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
        if plot_accuracy(run_dir / "accuracy.png", curves, start):
            lines += ["", "![held-out accuracy during the GRPO stages](accuracy.png)"]
        else:
            lines += ["", "held-out accuracy 0% at every evaluation of the GRPO stages (not plotted)"]
    lines += rm_ranking_lines(rms) + components_lines(evals)
    for name, kind in stages:
        rows = read_metrics(run_dir / name)
        if kind == "grpo" and rows:
            lines += _grpo_section(run_dir, name, rows)
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
