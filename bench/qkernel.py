"""Micro-benchmark of the quantized matrix-vector products of one SmolLM2-135M decode token: the
121 products (30 layers of fused qkv, o, fused gate/up, down, and the 49152-row head), each
matrix its own (so nothing stays in cache), batch 1 (--rows R: R rows of x, as a prefill of R
tokens makes). Prints one JSON line per thread count: ms per token (per R tokens) and GB/s of
weight bytes streamed for each kernel; "packed": the decode layout's kernel (qlinear_packed).

    PYTHONPATH=. python bench/qkernel.py [--threads 1,2] [--reps 5] [--rows 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import cpu_info
from zerolm.quant import formats, kernels

D, FFN, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = [(D + 2 * KV, D), (D, D), (2 * FFN, D), (D, FFN)] * LAYERS + [(VOCAB, D)]  # (N, K)


def _time(step: Callable[[], object], reps: int) -> float:
    step()  # warm: page in, first-call set-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _int4pack(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's int4 layout: asymmetric codes 0..15 and (scale, zero) pairs (K/group, N, 2) bf16."""
    n, k = w.shape
    b = w.reshape(n, k // group, group)
    lo, hi = b.amin(-1), b.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((b - lo[..., None]) / scale[..., None]).round().clamp(0, 15).reshape(n, k).int()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zero = lo + 8 * scale  # ATen dequantizes (q - 8) * scale + zero
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
    return packed, sz


def kernels_for(
    ws: list[torch.Tensor], rows: int = 1
) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (one token's 121 products, weight bytes read)."""
    xs = {k: torch.randn(rows, k) for k in (D, FFN)}
    xb = {k: v.bfloat16() for k, v in xs.items()}
    out: dict[str, tuple[Callable[[], object], int]] = {}
    out["fp32 F.linear"] = (
        lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
        4 * sum(w.numel() for w in ws),
    )
    for name, bits in (("op int8 g32", 8), ("op int4 sym g32", 4)):
        qs = [formats.quantize(w, bits, 32) for w in ws]
        nbytes = sum(q.qweight.numel() + 2 * q.scales.numel() for q in qs)
        if kernels.load():
            out[name] = (
                lambda qs=qs, b=bits: [
                    kernels.linear(xs[q.scales.shape[1] * 32], *q, b) for q in qs
                ],
                nbytes,
            )
            ps = [kernels.pack(q, bits) for q in qs]
            out[name + " packed"] = (
                lambda qs=qs, ps=ps, b=bits: [
                    kernels.linear(xs[q.scales.shape[1] * 32], *q, b, None, p)
                    for q, p in zip(qs, ps)
                ],
                nbytes,
            )
    i8 = [(w / w.abs().amax(1, keepdim=True) * 127).round().to(torch.int8) for w in ws]
    sc = [w.abs().amax(1) / 127 for w in ws]
    mm8 = torch.ops.aten._weight_int8pack_mm
    nb8 = sum(q.numel() + 4 * s.numel() for q, s in zip(i8, sc))
    out["aten int8pack fp32 x"] = (lambda: [mm8(xs[q.shape[1]], q, s) for q, s in zip(i8, sc)], nb8)
    scb = [s.bfloat16() for s in sc]
    out["aten int8pack bf16 x"] = (
        lambda: [mm8(xb[q.shape[1]], q, s) for q, s in zip(i8, scb)],
        nb8,
    )
    p4 = [_int4pack(w, 32) for w in ws]
    mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu
    nb4 = sum(p.numel() + 2 * s.numel() for p, s in p4)
    out["aten int4pack bf16 x g32"] = (
        lambda: [mm4(xb[w.shape[1]], p, 32, s) for w, (p, s) in zip(ws, p4)],
        nb4,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=1, help="rows of x per product (1: decode)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) * 0.05 for n, k in SHAPES]
    runs = kernels_for(ws, args.rows)
    with torch.no_grad():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            row: dict = {
                "threads": threads,
                "rows": args.rows,
                "load": os.getloadavg()[0],
                **cpu_info(),
            }
            for name, (step, nbytes) in runs.items():
                s = _time(step, args.reps)
                row[name] = {
                    "ms": round(s * 1e3, 2),
                    "tok_s": round(args.rows / s, 1),
                    "GB_s": round(nbytes / s / 1e9, 1),
                }
            print(json.dumps(row))


if __name__ == "__main__":
    main()
