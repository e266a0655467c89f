"""Training-throughput benchmark: tokens/s and MFU of one training step for the presets simple,
gpt2 and llama at ≈1 M and ≈10 M non-embedding parameters, in three modes: fp32, bf16 autocast,
and bf16 autocast with torch.compile of the whole loss function (the Trainer's `train.compile`).

A step = forward + float32 cross-entropy over every position + backward + AdamW step + zero_grad
(no clipping, no lr schedule: identical on both sides). Random token batches, seeded; warm-up
steps excluded; the figure is the median step time over --steps timed steps.

Reference, measured in the same run on the same weights: HF transformers (GPT2LMHeadModel /
LlamaForCausalLM loaded with from_pretrained from `export_hf` of the very same zerolm model),
trained with the same torch.optim.AdamW settings. `simple` has no HF counterpart ("reference":
null). `ratio` = zerolm tokens/s in its fastest mode ÷ HF tokens/s in its fastest eager precision
(HF as it is usually run); `ratio_fp32` / `ratio_bf16` / `ratio_bf16+compile` compare one mode, the
last against HF compiled the same way (torch.compile of its loss function). MFU = train FLOPs per
token (zerolm.inspect `account` at context --seq) × tokens/s ÷ the matmul peak measured in this run
for that precision (account counts an untied input embedding as a matmul too, so llama's MFU
includes 6·V·D per token of lookup "FLOPs" that no one computes).

    .venv/bin/python bench/train.py [--steps 8] [--warmup 2] [--batch 16] [--seq 128] [--threads N]
        [--presets simple,gpt2,llama] [--sizes 1M,10M] [--quick]

On a busy machine run with OMP_WAIT_POLICY=PASSIVE (see DESIGN §4); it is recorded either way.
Prints progress to stderr and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers
from common import cpu_info  # bench/common.py (scripts run from bench/)

from zerolm.config import ModelConfig, TrainConfig
from zerolm.inspect.accounting import account
from zerolm.interop.hf import export_hf
from zerolm.model import build_model
from zerolm.train.losses import lm_loss
from zerolm.train.optim import build_optimizer
from zerolm.train.precision import autocast, measure_peak_flops

PRESETS = ("simple", "gpt2", "llama")
SIZES = {
    "1M": dict(d_model=128, n_layers=5, n_heads=4),
    "10M": dict(d_model=384, n_layers=6, n_heads=6),
}
PRECISIONS = ("fp32", "bf16")
MODES = (*PRECISIONS, "bf16+compile")
OPTIM = (
    TrainConfig()
)  # lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only, fused
CPU = torch.device("cpu")


def zerolm_loss(model, batch):
    return lm_loss(model, batch).loss


def hf_loss(model, batch):
    """Loss from `.logits` exactly as lm_loss computes it (float32 CE over all B·T positions); the
    `labels=` path would add a label shift + pad and HF's loss bookkeeping, i.e. different work."""
    x, y = batch
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def median_step_s(model, loss_fn, precision, batches, steps, warmup) -> float:
    """Median time of one optimizer step; the compile (if any) happens in the warm-up steps."""
    # build_optimizer is plain torch.optim.AdamW over generic decay/no-decay groups (dim >= 2
    # decays), so using it for the HF model too gives both sides the very same optimizer and
    # settings
    opt = build_optimizer(model, OPTIM)
    model.train()
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        with autocast(precision, CPU):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_row(model, loss_fn, mode, init, batches, args, tokens, fpt, peaks) -> dict:
    """mode: "fp32", "bf16" or "bf16+compile" (torch.compile of the whole loss function, as the
    Trainer's train.compile does)."""
    precision, compiled = mode.split("+")[0], mode.endswith("+compile")
    model.load_state_dict(init)  # every run starts from the same weights
    if compiled:
        torch._dynamo.reset()
        loss_fn = torch.compile(loss_fn)
        t0 = time.perf_counter()
        median_step_s(model, loss_fn, precision, batches, 1, 1)  # compile outside the timed steps
        compile_s = time.perf_counter() - t0
        model.load_state_dict(init)
    t = median_step_s(model, loss_fn, precision, batches, args.steps, args.warmup)
    out = {
        "step_ms": round(1e3 * t, 2),
        "tok_per_s": round(tokens / t, 1),
        "mfu": round(fpt * tokens / t / peaks[precision], 4),
    }
    if compiled:
        out["compile_s"] = round(compile_s, 1)
    return out


def bench_one(preset, size, args, peaks) -> dict:
    cfg = ModelConfig(preset=preset, vocab_size=args.vocab, max_seq_len=args.seq, **SIZES[size])
    model = build_model(cfg, seed=0)
    acc = account(model, context=args.seq)
    fpt, tokens = acc["train_flops_per_token"], args.batch * args.seq
    gen = torch.Generator().manual_seed(1)
    batches = [
        tuple(torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen) for _ in "xy")
        for _ in range(4)
    ]
    row = {
        "preset": preset,
        "size": size,
        "config": {
            k: getattr(model.cfg, k)
            for k in (
                "d_model",
                "n_layers",
                "n_heads",
                "d_ff",
                "vocab_size",
                "max_seq_len",
                "dropout",
                "tie_embeddings",
            )
        },
        "non_embedding_params": acc["non_embedding"],
        "total_params": acc["total"],
        "train_flops_per_token": fpt,
        "zerolm": {},
    }
    common = (batches, args, tokens, fpt, peaks)
    hf = None
    if preset != "simple":
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(model, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            hf_init = {
                k: v.clone() for k, v in hf.state_dict().items()
            }  # own memory, not the temp file's
        with torch.no_grad():  # same weights, same function: the logits agree (fp32, eval)
            diff = (
                (model.eval()(batches[0][0]) - hf.eval()(input_ids=batches[0][0]).logits)
                .abs()
                .max()
                .item()
            )
    init = {k: v.clone() for k, v in model.state_dict().items()}
    print(
        f"{preset}-{size}: {acc['non_embedding']:,} non-embedding, "
        f"{acc['total']:,} total parameters",
        file=sys.stderr,
    )
    z, r = row["zerolm"], {}
    for mode in MODES:  # zerolm and HF back to back per mode: both see the same machine load
        z[mode] = timed_row(model, zerolm_loss, mode, init, *common)
        if hf is not None:
            r[mode] = timed_row(hf, hf_loss, mode, hf_init, *common)
    z["fastest"] = max(MODES, key=lambda p: z[p]["tok_per_s"])
    if hf is None:
        row["reference"] = row["ratio"] = None
        return row
    hf_params = sum(p.numel() for p in hf.parameters())  # tied weights count once
    assert hf_params == acc["total"], (hf_params, acc["total"])
    r["fastest"] = max(PRECISIONS, key=lambda p: r[p]["tok_per_s"])  # HF as its users run it: eager
    row["reference"] = {
        "name": f"transformers {type(hf).__name__}",
        "attn_implementation": hf.config._attn_implementation,
        "total_params": hf_params,
        "max_abs_logit_diff": float(f"{diff:.2e}"),
        **r,
    }
    row["ratio"] = round(z[z["fastest"]]["tok_per_s"] / r[r["fastest"]]["tok_per_s"], 3)
    for p in MODES:
        row[f"ratio_{p}"] = round(z[p]["tok_per_s"] / r[p]["tok_per_s"], 3)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads"
    )
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 2 steps, 1 warm-up, batch 4, seq 64"
    )
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch, args.seq = 2, 1, 4, 64
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    result = {
        "bench": "train",
        "machine": {
            **cpu_info(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "loadavg_start": os.getloadavg(),
        },
        "quick": args.quick,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch": args.batch,
        "seq": args.seq,
        "vocab_size": args.vocab,
        "optimizer": "torch.optim.AdamW lr=1e-3 betas=(0.9,0.95) wd=0.1 fused",
    }
    peaks = {p: measure_peak_flops(p, CPU) for p in PRECISIONS}
    result["peak_gflop_s"] = {p: round(v / 1e9, 1) for p, v in peaks.items()}
    print(f"measured peaks (GFLOP/s): {result['peak_gflop_s']}", file=sys.stderr)
    result["models"] = {}
    for size in args.sizes.split(","):
        for preset in args.presets.split(","):
            row = bench_one(preset, size, args, peaks)
            result["models"][f"{preset}-{size}"] = row
            print(
                json.dumps({k: row.get(k) for k in ("zerolm", "reference", "ratio")}),
                file=sys.stderr,
            )
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
