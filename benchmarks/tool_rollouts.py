"""GRPO step time with and without tools, side by side in one run, on a model that sometimes calls the python tool
(recipes/quickstart-tools.yaml's SFT stage), and what a tool call costs on its own:

    python benchmarks/tool_rollouts.py --model runs/quickstart-tools/sft/final [--steps 10]

1. The same GRPO run (the quickstart-tools stage's settings: G=8, 16 prompts, T=0.5, 64 new tokens) with
   tools.protocol=none and with fence + python: mean perf/step_s, perf/generate_s, tools/used_frac over steps 2..
2. One python tool call in the OS sandbox (`print(2 + 3)`): median seconds over 20 calls, and 16 calls with 8
   workers (a step's worth when every sample of two groups calls).
Prints a JSON object; say the machine's load beside the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def grpo(model: Path, out: Path, steps: int, tools: list[str]) -> dict:
    from align.config import load_config
    from align.grpo.config import GRPOConfig
    from align.grpo.loop import train_grpo
    from align.run.metrics import read_metrics

    data = ROOT / "data" / "arith"
    cfg = load_config(GRPOConfig, None, [
        f"model.path={model}", f"output_dir={out}", f"train_data=[{data}/rl_prompts.jsonl]",
        "rewards=[{name: exact_answer}]", "group_size=8", "prompts_per_step=16", f"steps={steps}", "lr=5.0e-5",
        "sampling.temperature=0.5", "sampling.max_new_tokens=64", "micro_batch_size=128", "save_every=0",
        "routing_metrics_every=0", "tensorboard=false", *tools])
    train_grpo(cfg)
    rows = [r for r in read_metrics(out) if "perf/step_s" in r][1:]  # step 1 warms up
    keys = ("perf/step_s", "perf/generate_s", "tools/used_frac", "tools/calls", "rollout/completion_len")
    return {k: statistics.fmean(r[k] for r in rows) for k in keys if k in rows[0]}


def sandbox_calls() -> dict:
    import concurrent.futures

    from align.rollout.tools import ToolsConfig, call_tool, toolbox

    box = toolbox(ToolsConfig(protocol="fence"))
    one = []
    for _ in range(20):
        t = time.perf_counter()
        answer, failed = call_tool(box, "python", {"code": "print(2 + 3)"}, None, ())
        one.append(time.perf_counter() - t)
        assert answer.strip() == "5" and not failed, answer
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: call_tool(box, "python", {"code": "print(2 + 3)"}, None, ()), range(16)))
    return {"python_call_median_s": statistics.median(one), "python_16_calls_8_workers_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="a policy that sometimes calls the tool")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="align-tools-"))
    results = {"sandbox": sandbox_calls(),
               "without_tools": grpo(args.model, work / "none", args.steps, []),
               "with_tools": grpo(args.model, work / "fence", args.steps, [
                   "tools.protocol=fence", "tools.max_turns=2", "tools.max_output_tokens=32"])}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
