"""LoRA versus full fine-tuning on the same data: held-out loss, trainable parameters, optimizer
state, peak memory and time per step, each run in its own `zerolm sft` process.

    .venv/bin/python bench/sft.py [--model runs/speedrun/model] [--docs runs/speedrun/docs]
        [--steps 150] [--rank 8] [--targets q,k,v,o,up,gate,down]

Needs a pretrained model (the speedrun's). Both runs: the bundled recipe speedrun-sft (poem
instructions), the same steps, seed and precision; `lora` adds --lora.rank/--lora.targets and a
10x learning rate (adapters start at zero and need larger steps, as is usual for LoRA).
Peak memory = the child process's maximum resident set size. Time per step = the median over
logged steps after the first 5 (compile and warm-up excluded). Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_info

ROOT = Path(__file__).resolve().parent.parent


def run(args, out: Path, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "zerolm",
        "sft",
        "--config",
        "speedrun-sft",
        "--model",
        args.model,
        "--out",
        str(out),
        "--quiet",
        f"--poems.docs={args.docs}",
        f"--train.steps={args.steps}",
        f"--train.eval_every={args.steps}",
        f"--train.ckpt_every={args.steps}",
        "--train.precision=bf16",
        *extra,
    ]
    code = (
        "import resource, runpy, sys; sys.argv = ['zerolm'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('zerolm', run_name='__main__')\nfinally:\n"
        "    print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "file=sys.stderr)"
    )
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", code, *cmd[3:]], capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"sft failed:\n{p.stderr[-3000:]}")
    rss = int(next(ln.split()[1] for ln in p.stderr.splitlines() if ln.startswith("MAXRSS_KB")))
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    step_s = statistics.median(r["tokens"] / r["tok_per_s"] for r in rows[5:])
    report = next(
        (
            json.loads(ln.split("LoRA: ", 1)[1])
            for ln in p.stderr.splitlines()
            if ln.startswith("LoRA: ")
        ),
        None,
    )
    final = rows[-1]
    return {
        "held_out_loss": round(final["val_loss"], 4),
        "train_loss_last": round(final["loss"], 4),
        "step_ms": round(1e3 * step_s, 1),
        "peak_rss_mb": round(rss / 1024, 1),
        "wall_s": round(wall, 1),
        "lora": report,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/speedrun/model")
    ap.add_argument("--docs", default="runs/speedrun/docs")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q,k,v,o,up,gate,down")
    args = ap.parse_args()
    if not (Path(args.model) / "model.safetensors").is_file():
        raise SystemExit(
            f"no model at {args.model}: run `zerolm speedrun` first (or pass --model/--docs)"
        )
    args.model, args.docs = str(Path(args.model).resolve()), str(Path(args.docs).resolve())
    from zerolm.model import load_model

    n_params = sum(p.numel() for p in load_model(args.model).parameters())
    with tempfile.TemporaryDirectory() as tmp:
        full = run(args, Path(tmp) / "full", ["--train.lr=1e-3"])
        lora = run(
            args,
            Path(tmp) / "lora",
            ["--train.lr=1e-2", f"--lora.rank={args.rank}", f"--lora.targets={args.targets}"],
        )
    full["trainable_params"], full["optimizer_state_bytes"] = n_params, 8 * n_params
    lora["trainable_params"] = lora["lora"]["trainable"]
    lora["optimizer_state_bytes"] = lora["lora"]["optimizer_bytes_lora"]
    print(
        json.dumps(
            {
                "bench": "sft",
                "machine": {
                    **cpu_info(),
                    "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "loadavg": os.getloadavg(),
                    "maxrss_unit": "KiB (Linux ru_maxrss)",
                },
                "model": args.model,
                "steps": args.steps,
                "rank": args.rank,
                "targets": args.targets.split(","),
                "full": full,
                "lora": lora,
                "ratio_step_time": round(lora["step_ms"] / full["step_ms"], 3),
                "ratio_peak_rss": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
