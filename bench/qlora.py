"""QLoRA versus LoRA over fp32 on the same data, steps and seed: peak memory, held-out loss and time
per step, each run as `zerolm sft` in its own fresh process.

    .venv/bin/python bench/qlora.py [--model /tmp/ql/smol] [--work /tmp/ql] [--steps 30]
        [--batch 4] [--seq 128] [--rank 8] [--targets q,k,v,o] [--precision fp32]

--model is a float model directory (SmolLM2-135M: `zerolm import --from hf /work/cache/smol/hf
--out /tmp/ql/smol`). Its int8 and int4 copies (quantize_model + save_model, RTN at group 32,
head int8) are written under --work once. Variants: lora-fp32 (the float dir), qlora-int8 and
qlora-int4 (the quantized dirs), qlora-int4-fly (the float dir with --lora.base_quant=int4, which
must load the float weights before quantizing them). Data: the builtin chitchat conversations.
peak_rss_train_mb = the child's ru_maxrss when training and the final held-out evaluation are done
(before the model is merged and saved); peak_rss_mb = at exit. Time per step = the median over
logged steps after the first 3. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import cpu_info

ROOT = Path(__file__).resolve().parent.parent

# the child: zerolm's CLI, with ru_maxrss taken just before the stage saves its model
CHILD = """import resource, runpy, sys
import zerolm.finetune.sft as sft
save = sft.save_trainable
def saving(*a, **k):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print('TRAIN_MAXRSS_KB', rss, file=sys.stderr, flush=True)
    return save(*a, **k)
sft.save_trainable = saving
sys.argv = ['zerolm'] + sys.argv[1:]
try:
    runpy.run_module('zerolm', run_name='__main__')
finally:
    print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def quantized_copies(model: str, work: Path) -> dict[str, Path]:
    """The int8 and int4 copies of `model` (written once, reused)."""
    from zerolm.config import QuantConfig
    from zerolm.model import load_model, save_model
    from zerolm.tokenizer import Tokenizer
    from zerolm.transforms.quantize import quantize_model

    out = {}
    for method in ("int8", "int4"):
        d = work / f"smol-{method}"
        if not (d / "model.safetensors").is_file():
            q = quantize_model(load_model(model), QuantConfig(method=method))
            save_model(q, d, Tokenizer.load(model))
        out[method] = d
    return out


def _kb(stderr: str, key: str) -> int:
    return int(next(ln.split()[1] for ln in stderr.splitlines() if ln.startswith(key)))


def run(args, base: Path, out: Path, extra: list[str]) -> dict:
    cmd = [
        "sft",
        f"--sft.base_model={base}",
        "--sft.builtin=chitchat",
        f"--sft.max_per_source={args.conversations}",
        f"--sft.max_seq_len={args.seq}",
        f"--out={out}",
        "--quiet",
        f"--seed={args.seed}",
        f"--train.steps={args.steps}",
        f"--train.batch_size={args.batch}",
        f"--train.lr={args.lr}",
        "--train.warmup_steps=3",
        f"--train.precision={args.precision}",
        f"--train.eval_every={args.steps}",
        f"--train.ckpt_every={10 * args.steps}",
        "--train.log_every=1",
        f"--lora.rank={args.rank}",
        f"--lora.targets={args.targets}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-c", CHILD, *cmd], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if p.returncode:
        raise SystemExit(f"sft failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tok_per_s" in r]
    step_s = statistics.median(r["tokens"] / r["tok_per_s"] for r in steps[3:] or steps)
    final = next(r for r in reversed(rows) if r.get("val_loss") is not None)
    return {
        "held_out_loss": round(final["val_loss"], 4),
        "train_loss_last": round(steps[-1]["loss"], 4),
        "step_ms": round(1e3 * step_s, 1),
        "peak_rss_train_mb": round(_kb(p.stderr, "TRAIN_MAXRSS_KB") / 1024, 1),
        "peak_rss_mb": round(_kb(p.stderr, "MAXRSS_KB") / 1024, 1),
        "base_file_mb": round((base / "model.safetensors").stat().st_size / 2**20, 1),
        "saved_model_mb": round((out / "model" / "model.safetensors").stat().st_size / 2**20, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/tmp/ql/smol")
    ap.add_argument("--work", default="/tmp/ql")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--conversations", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--variants", default="lora-fp32,qlora-int8,qlora-int4,qlora-int4-fly")
    args = ap.parse_args()
    if not (Path(args.model) / "model.safetensors").is_file():
        raise SystemExit(
            f"no model at {args.model}: run `zerolm import --from hf /work/cache/smol/hf "
            f"--out {args.model}` first (or pass --model)"
        )
    work = Path(args.work).resolve()
    model = Path(args.model).resolve()
    copies = quantized_copies(str(model), work)
    variants = {
        "lora-fp32": (model, []),
        "qlora-int8": (copies["int8"], []),
        "qlora-int4": (copies["int4"], []),
        "qlora-int4-fly": (model, ["--lora.base_quant=int4"]),
    }
    results = {}
    for name in args.variants.split(","):
        base, extra = variants[name]
        out = work / "runs" / f"{name}-{os.getpid()}"
        results[name] = run(args, base, out, extra)
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    ref = results.get("lora-fp32")
    ratios = {
        k: round(v["peak_rss_train_mb"] / ref["peak_rss_train_mb"], 3)
        for k, v in results.items()
        if ref and k != "lora-fp32"
    }
    print(
        json.dumps(
            {
                "bench": "qlora",
                "machine": {
                    **cpu_info(),
                    "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "loadavg": os.getloadavg(),
                },
                "model": str(model),
                "steps": args.steps,
                "batch": args.batch,
                "seq": args.seq,
                "rank": args.rank,
                "targets": args.targets.split(","),
                "precision": args.precision,
                "variants": results,
                "peak_rss_train_vs_lora_fp32": ratios,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
