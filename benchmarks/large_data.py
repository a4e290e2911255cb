"""A 200 MB JSONL: seconds from the command's start to training, and peak RSS, for `align sft` and `align grpo`.

    python benchmarks/large_data.py [--root DIR] [--mb 200] [--work /tmp/align-large] [--stage sft|grpo|both]

Makes (once, in --work) the tiny model (`align tiny`) and two files of about --mb MB each by repeating the bundled
rows with fresh ids: `sft.jsonl` from data/arith/train.jsonl (chats), `grpo.jsonl` from data/arith/rl_prompts.jsonl
(prompts with an answer). Then runs each stage as a user would, `/usr/bin/time -v python -m align sft|grpo ...`,
with PYTHONPATH=--root (default: this checkout; point it at another checkout to measure that one), one optimizer
step (sft max_steps=1; grpo steps=1, 2 prompts x G=2), no held-out data. Printed per stage: seconds until the stage
prints its start line (`... new run`: data loaded and checked, the run set up, the first step about to begin),
seconds to the end of the process (one step and the final save included), CPU seconds of the whole process (user +
system: what the load of a shared machine does not inflate), peak RSS (`Maximum resident set size`),
and the 1-minute load average before and after (the machine is shared: the same command can take twice as long).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "arith"


def make_file(src: Path, out: Path, megabytes: float) -> int:
    """`out`: the rows of `src` repeated (each copy's ids suffixed `-copyK`) until it holds `megabytes` MB; rows."""
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    target, size, n = int(megabytes * 1e6), 0, 0
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        copy = 0
        while size < target:
            for row in rows:
                line = json.dumps({**row, "id": f"{row['id']}-copy{copy}"}) + "\n"
                f.write(line)
                size, n = size + len(line.encode()), n + 1
            copy += 1
    tmp.rename(out)
    return n


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 1)[0]


def run_stage(stage: str, args, model: Path, data: Path) -> dict:
    out = Path(args.work) / f"run-{stage}-{int(time.time())}"
    common = [f"model.path={model}", f"output_dir={out}", f"train_data=[{data}]", "tensorboard=false",
              "save_every=0", "seed=0"]
    if stage == "sft":
        extra = ["max_steps=1", "batch_size=8", "max_length=128", "log_every=1"]
    else:
        extra = ["steps=1", "prompts_per_step=2", "group_size=2", "micro_batch_size=4", "rewards=[{name: math}]",
                 "sampling.max_new_tokens=8", "log_completions=0", "eval_every=0"]
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "align", stage, *common, *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(args.root).resolve()), "PYTHONUNBUFFERED": "1"}
    before = loadavg()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=args.work)
    started, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if started is None and line.startswith(f"{stage}:") and "new run" in line:
            started = time.time() - t0
    proc.wait()
    total = time.time() - t0
    text = "".join(lines)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text))
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        print(text[-3000:])
    return {"stage": stage, "rc": proc.returncode, "to_start_s": round(started, 1) if started else None,
            "total_s": round(total, 1), "cpu_s": round(cpu, 1),
            "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
            "load_before": before, "load_after": loadavg(), "root": str(args.root)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=str(ROOT), help="The align checkout to measure (its directory on PYTHONPATH).")
    p.add_argument("--mb", type=float, default=200.0)
    p.add_argument("--work", default="/tmp/align-large")
    p.add_argument("--stage", choices=("sft", "grpo", "both"), default="both")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "align", "tiny", str(model)], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    files = {"sft": (DATA / "train.jsonl", work / "sft.jsonl"),
             "grpo": (DATA / "rl_prompts.jsonl", work / "grpo.jsonl")}
    for stage in ("sft", "grpo") if args.stage == "both" else (args.stage,):
        src, out = files[stage]
        if not out.exists():
            t = time.time()
            rows = make_file(src, out, args.mb)
            print(f"made {out}: {rows} rows, {out.stat().st_size / 1e6:.0f} MB in {time.time() - t:.0f} s", flush=True)
        print(json.dumps(run_stage(stage, args, model, out)), flush=True)


if __name__ == "__main__":
    main()
