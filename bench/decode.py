"""Decode benchmark: batch-1 greedy generation tokens/s of llama models (≈10 M non-embedding,
vocab 8192; ≈58 M in total, vocab 32000; max_seq_len 512), fp32, under torch.inference_mode.

Measured in one run on the same weights, for each thread count in --threads:
  zerolm_cached    zerolm Engine with its KV cache (temperature 0 = greedy)
  zerolm_compiled  the same with Engine(compile=True): the decode step exported and compiled ahead
                   of time by AOTInductor, weights frozen, matrix-vector products in Inductor's C++
                   GEMM kernels on packed weights (`zerolm generate --compile`); compiled once per
                   thread count (its kernels fix it) in the untimed warm-up, reported as `compile_s`
                   (into a fresh folder: never loaded from an earlier run)
  zerolm_nocache   model(ids)[:, -1].argmax() on the whole sequence for every new token
  hf_cached        HF transformers generate(do_sample=False, use_cache=True) on the model loaded
                   with from_pretrained from `export_hf` of the very same zerolm model
  hf_nocache       the same with use_cache=False
tokens/s = new tokens ÷ wall time of the whole call (prefill of the prompt included); median over
--repeats, methods interleaved within each repeat; one untimed warm-up call of each first.
`ratio` = zerolm_cached ÷ hf_cached, `ratio_compiled` = zerolm_compiled ÷ hf_cached.
`tokens_match`: zerolm cached and HF cached produced the same greedy tokens
(`compiled_tokens_match`: zerolm compiled and HF cached).

Memory-bandwidth bound: fp32 weight bytes read per decoded token (every parameter, except that the
untied input embedding reads one row; the head matrix is read whole; KV-cache reads not counted)
÷ copy bandwidth. Convention: copy bandwidth = (bytes read + bytes written) ÷ time of a large
`dst.copy_(src)` (2 × buffer size, as STREAM Copy counts), median of 5, measured once in each
repeat (before its generations) and the median of those taken. `bound_tok_per_s` uses it;
`fraction_of_bound` = zerolm_cached ÷ bound, `fraction_of_bound_compiled` = zerolm_compiled ÷ bound.
A read-only figure (a `sum` over the buffer) and its bound are given too, since decode only reads
weights.

Matrix-vector ceiling: `matvec_tok_per_s` = 1 / time of only the matrix-vector products one decode
step makes (every linear layer and the head, on the model's own weights in its decode layout, one
F.linear each, nothing else), median of 20; `matvec_gb_s` is the weight bytes they read per second
and `fraction_of_matvec` = zerolm_cached ÷ matvec_tok_per_s. It separates the two gaps: decode vs
its matrix-vector products (overhead of everything else), and those products vs the bound (how
fast the fp32 matrix-vector kernel streams weights on this CPU).

    .venv/bin/python bench/decode.py [--new 128] [--prompt 16] [--repeats 3] [--threads 1,2]
        [--quick]

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
from functools import partial

import torch
import torch.nn.functional as F
import transformers
from common import cpu_info  # bench/common.py (scripts run from bench/)

from zerolm.config import ModelConfig
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.inspect.accounting import account
from zerolm.interop.hf import export_hf
from zerolm.model import build_model
from zerolm.model.attention import Attention, FusedQKVAttention
from zerolm.model.layers import FFN, FusedGateUpFFN
from zerolm.transforms.layout import decode_layout

SIZES = {
    "10M": dict(d_model=384, n_layers=6, n_heads=6, vocab_size=8192),
    "60M": dict(d_model=512, n_layers=8, n_heads=8, vocab_size=32000),
}
METHODS = ("zerolm_cached", "zerolm_compiled", "zerolm_nocache", "hf_cached", "hf_nocache")


def zerolm_cached(engine, prompt, new):
    req = GenerateRequest(max_new_tokens=new, sampling=SamplingParams(temperature=0.0))
    return engine.generate([prompt], req)[0]


@torch.inference_mode()
def zerolm_nocache(model, prompt, new):
    ids = torch.tensor([prompt])  # (1, P)
    for _ in range(new):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, len(prompt) :].tolist()


@torch.inference_mode()
def hf_generate(hf, prompt, new, use_cache):
    ids = torch.tensor([prompt])  # (1, P)
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )  # the export has no eos: always `new` tokens
    return out[0, len(prompt) :].tolist()


def bandwidth(mb: int, repeats: int = 5) -> tuple[float, float]:
    """(copy GB/s counting read + write bytes, read-only GB/s of a sum) over a `mb` MB fp32
    buffer."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    copy, read = [], []
    for i in range(repeats + 1):  # the first round faults the pages in: untimed
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        src.sum()
        t2 = time.perf_counter()
        if i:
            copy.append(t1 - t0)
            read.append(t2 - t1)
    return 2 * src.nbytes / statistics.median(copy) / 1e9, src.nbytes / statistics.median(
        read
    ) / 1e9


def weight_bytes_per_token(model) -> int:
    """fp32 bytes of weights one decode step reads: all, but lookup tables (an untied input
    embedding, learned positions) only one row each."""
    read = sum(p.numel() for p in model.parameters())
    tables = [model.pos_emb] + ([model.tok_emb] if model.lm_head is not None else [])
    for t in filter(None, tables):
        read -= t.weight.numel() - t.weight.shape[1]
    return 4 * read


@torch.inference_mode()
def matvec_seconds(model, repeats: int = 20) -> tuple[float, int]:
    """(median time, weight bytes) of one decode step's matrix-vector products alone: the fused
    q/k/v and gate/up matrices where decode_layout made them, every other linear, the head."""
    mats = []
    for mod in model.modules():
        if isinstance(mod, FusedQKVAttention):
            mats += [mod.wqkv.weight, mod.o.weight]
        elif isinstance(mod, Attention):
            mats += [mod.q.weight, mod.k.weight, mod.v.weight, mod.o.weight]
        elif isinstance(mod, FusedGateUpFFN):
            mats += [mod.gate_up.weight, mod.down.weight]
        elif isinstance(mod, FFN):
            mats += [mod.up.weight, mod.down.weight]
    mats.append(model.tok_emb.weight if model.lm_head is None else model.lm_head.weight)
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in mats}
    times = []
    for i in range(repeats + 2):  # the first two untimed
        t0 = time.perf_counter()
        for w in mats:
            F.linear(xs[w.shape[1]], w)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(4 * w.numel() for w in mats)


def bench_size(size, args) -> dict:
    cfg = ModelConfig(preset="llama", max_seq_len=512, **SIZES[size])
    model = build_model(cfg, seed=0).eval()
    acc = account(model)
    wbytes = weight_bytes_per_token(model)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=gen).tolist()
    row = {
        "config": {
            k: getattr(model.cfg, k)
            for k in (
                "d_model",
                "n_layers",
                "n_heads",
                "n_kv_heads",
                "d_ff",
                "vocab_size",
                "max_seq_len",
                "tie_embeddings",
            )
        },
        "total_params": acc["total"],
        "non_embedding_params": acc["non_embedding"],
        "weight_bytes_per_token": wbytes,
        "threads": {},
    }
    print(
        f"llama-{size}: {acc['total']:,} parameters ({acc['non_embedding']:,} non-embedding)",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as tmp:  # alive while HF may still map its weights from it
        export_hf(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        assert sum(p.numel() for p in hf.parameters()) == acc["total"]
        decode_layout(model)  # what `zerolm generate` does: same values, decode-friendly layout
        for n in args.threads:
            torch.set_num_threads(n)
            fns = {
                "zerolm_cached": partial(zerolm_cached, Engine(model)),
                "zerolm_compiled": partial(
                    zerolm_cached, Engine(model, compile=True, program_dir=tmp)
                ),
                "zerolm_nocache": partial(zerolm_nocache, model),
                "hf_cached": partial(hf_generate, hf, use_cache=True),
                "hf_nocache": partial(hf_generate, hf, use_cache=False),
            }
            t0 = time.perf_counter()
            fns["zerolm_compiled"](prompt, min(args.new, 16))  # warm-up, compiling
            compile_s = time.perf_counter() - t0
            for fn in fns.values():
                fn(prompt, min(args.new, 16))  # warm-up
            times, outs, bws = {m: [] for m in METHODS}, {}, []
            for _ in range(args.repeats):
                bws.append(
                    bandwidth(args.copy_mb)
                )  # within the repeats: it drifts with the machine's load
                for m, fn in fns.items():
                    t0 = time.perf_counter()
                    outs[m] = fn(prompt, args.new)
                    times[m].append(time.perf_counter() - t0)
            assert all(len(o) == args.new for o in outs.values()), {
                m: len(o) for m, o in outs.items()
            }
            tps = {m: round(args.new / statistics.median(t), 1) for m, t in times.items()}
            copy_gbs, read_gbs = (statistics.median(b) for b in zip(*bws))
            bound = copy_gbs * 1e9 / wbytes
            mv_s, mv_bytes = matvec_seconds(model)
            r = {
                "threads": torch.get_num_threads(),
                "tok_per_s": tps,
                "ratio": round(tps["zerolm_cached"] / tps["hf_cached"], 3),
                "ratio_compiled": round(tps["zerolm_compiled"] / tps["hf_cached"], 3),
                "ratio_nocache": round(tps["zerolm_nocache"] / tps["hf_nocache"], 3),
                "tokens_match": outs["zerolm_cached"] == outs["hf_cached"],
                "compiled_tokens_match": outs["zerolm_compiled"] == outs["hf_cached"],
                "compile_s": round(compile_s, 1),
                "nocache_tokens_match": outs["zerolm_nocache"] == outs["zerolm_cached"],
                "copy_gb_s": round(copy_gbs, 2),
                "read_gb_s": round(read_gbs, 2),
                "bound_tok_per_s": round(bound, 1),
                "fraction_of_bound": round(tps["zerolm_cached"] / bound, 3),
                "fraction_of_bound_compiled": round(tps["zerolm_compiled"] / bound, 3),
                "bound_tok_per_s_read": round(read_gbs * 1e9 / wbytes, 1),
                "matvec_tok_per_s": round(1 / mv_s, 1),
                "matvec_gb_s": round(mv_bytes / mv_s / 1e9, 2),
                "fraction_of_matvec": round(tps["zerolm_cached"] * mv_s, 3),
            }
            row["threads"][str(n)] = r
            print(f"  threads {n}: {json.dumps(r)}", file=sys.stderr)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=128, help="new tokens per generation")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per method (median)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to run")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument(
        "--copy-mb", type=int, default=256, help="buffer size of the bandwidth measurement"
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 8 new tokens, 1 repeat, 64 MB copy"
    )
    args = ap.parse_args()
    if args.quick:
        args.new, args.repeats, args.copy_mb = 8, 1, 64
    args.threads = [int(t) for t in args.threads.split(",")]
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    result = {
        "bench": "decode",
        "machine": {
            **cpu_info(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": "float32",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "loadavg_start": os.getloadavg(),
        },
        "quick": args.quick,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "repeats": args.repeats,
        "bandwidth_convention": "copy_gb_s = (read + written bytes) / time of dst.copy_(src), "
        f"{args.copy_mb} MB fp32, median of 5, once per repeat, median over repeats; "
        "read_gb_s = bytes / time of src.sum()",
        "models": {},
    }
    for size in args.sizes.split(","):
        result["models"][f"llama-{size}"] = bench_size(size, args)
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
