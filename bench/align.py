"""Alignment stages on the speedrun model: peak memory and time per step of DPO (full and LoRA,
reference log-probs cached and live) and of PPO / GRPO (full and LoRA), each in its own
`zerolm dpo` / `zerolm ppo` process.

    .venv/bin/python bench/align.py [--model runs/speedrun/sft/model] [--docs runs/speedrun/docs]
        [--steps 30] [--batch 16] [--rank 8] [--only dpo-full-cached,ppo-full,...]

DPO pairs: held-out poem requests of the run, the real poem as chosen and another poem as
rejected (real lengths; no sampling, so the process's peak is the training's). PPO: poem
requests, reward poem-form, 32 prompts per rollout, replies up to 96 tokens, 2 epochs (GRPO: 8
prompts x 4 samples). All fp32, batch --batch, the same seed.

Peak memory = the child's maximum resident set size; `baseline` is a process that only imports
zerolm and loads the model, so peak - baseline is what the stage adds. Time per step = the median
over logged steps after the first 3; PPO's `step_s_mean` also counts the rollouts (generation,
scoring, the reference pass), and `rollout_s` is their median. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_info

ROOT = Path(__file__).resolve().parent.parent
RSS = (
    "import resource, runpy, sys; sys.argv = ['zerolm'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('zerolm', run_name='__main__')\nfinally:\n"
    "    print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"
)
BASELINE = (
    "import resource, sys\nfrom zerolm.model import load_model\nload_model(sys.argv[1])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"
)


def configs(args, pairs: Path) -> dict[str, list[str]]:
    lora = [
        f"--lora.rank={args.rank}",
        f"--lora.alpha={2 * args.rank}",
        "--lora.targets=q,k,v,o,up,gate,down",
    ]
    dpo = ["dpo", f"--align.data={pairs}", "--align.val_fraction=0", "--train.lr=1e-5"]
    ppo = [
        "ppo",
        "--align.builtin=poems",
        "--align.reward=poem-form",
        "--poems.val_requests=0",
        "--train.lr=5e-5",
    ]
    return {
        "dpo-full-cached": [*dpo, "--align.reference_logprobs=cached"],
        "dpo-full-live": [*dpo, "--align.reference_logprobs=live"],
        "dpo-lora-cached": [*dpo, "--align.reference_logprobs=cached", *lora],
        "dpo-lora-live": [*dpo, "--align.reference_logprobs=live", *lora],
        "ppo-full": ppo,
        "ppo-lora": [*ppo, *lora],
        "grpo-full": [
            *ppo,
            "--align.advantage=group",
            "--align.group=4",
            "--align.rollout_prompts=8",
        ],
    }


def peak_kb(p: subprocess.CompletedProcess) -> int:
    return int(next(ln.split()[1] for ln in p.stderr.splitlines() if ln.startswith("MAXRSS_KB")))


def run(args, name: str, cmd: list[str], out: Path) -> dict:
    argv = [
        cmd[0],
        "--model",
        args.model,
        "--out",
        str(out),
        "--quiet",
        f"--poems.docs={args.docs}",
        f"--train.steps={args.steps}",
        f"--train.batch_size={args.batch}",
        "--train.precision=fp32",
        f"--train.eval_every={10 * args.steps}",
        f"--train.ckpt_every={args.steps}",
        "--train.warmup_steps=2",
        "--train.log_every=1",
        *cmd[1:],
    ]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", RSS, *argv], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r["tokens"] / r["tok_per_s"] for r in rows]
    rollouts = [float(m) for m in re.findall(r"^rollout \d+: .* \| ([\d.]+)s$", p.stderr, re.M)]
    row = {
        "peak_rss_mb": round(peak_kb(p) / 1024, 1),
        "step_s_median": round(statistics.median(steps[3:]), 3),
        "step_s_mean": round(statistics.mean(steps[3:]), 3),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if rollouts:
        row |= {"rollouts": len(rollouts), "rollout_s": round(statistics.median(rollouts), 2)}
    if m := re.search(r"^LoRA: (.*)$", p.stderr, re.M):
        lora = json.loads(m.group(1))
        row |= {"trainable": lora["trainable"], "total": lora["total"]}
    print(f"{name}: {row}", file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/speedrun/sft/model")
    ap.add_argument("--docs", default="runs/speedrun/docs")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated config names")
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(
            f"{args.model} not found: run `zerolm speedrun` first (or give --model/--docs)"
        )
    sys.path.insert(0, str(ROOT))
    from zerolm.data.prepare import read_docs
    from zerolm.tasks.poems.requests import eval_requests

    with tempfile.TemporaryDirectory() as tmp:
        reqs = eval_requests(read_docs(Path(args.docs) / "val.jsonl"), seed=0, limit=256)
        pairs = Path(tmp) / "pairs.jsonl"
        with pairs.open("w", encoding="utf-8") as f:
            for i, r in enumerate(reqs):
                other = reqs[(i + 1) % len(reqs)]["messages"][-1]["content"]
                row = {
                    "prompt": r["messages"][0]["content"],
                    "chosen": r["messages"][-1]["content"],
                    "rejected": other,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        base = subprocess.run(
            [sys.executable, "-c", BASELINE, args.model], capture_output=True, text=True, cwd=ROOT
        )
        results = {"baseline": {"peak_rss_mb": round(peak_kb(base) / 1024, 1)}}
        wanted = set(filter(None, args.only.split(",")))
        for name, cmd in configs(args, pairs).items():
            if not wanted or name in wanted:
                results[name] = run(args, name, cmd, Path(tmp) / name)
    print(
        json.dumps(
            {
                "bench": "align",
                "model": args.model,
                "steps": args.steps,
                "batch": args.batch,
                "rank": args.rank,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                **cpu_info(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
