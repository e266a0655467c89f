"""Decode benchmark: batch-1 greedy generation tokens/s of llama models (≈10 M non-embedding,
vocab 8192; ≈58 M in total, vocab 32000; max_seq_len 512; 135M: SmolLM2-135M's shape, random
weights), fp32, under torch.inference_mode; and of any model directory given with --model-dir
(e.g. an imported SmolLM2: `zerolm import --from hf DIR --out OUT`), on its own weights.

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
`--methods` runs a subset (their figures only; the others' are null).
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
        [--sizes 10M,60M,135M] [--model-dir OUT ...] [--methods zerolm_cached,...] [--quick]

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
from zerolm.model import build_model, load_model
from zerolm.model.attention import Attention, FusedQKVAttention
from zerolm.model.layers import FFN, FusedGateUpFFN
from zerolm.transforms.layout import decode_layout

SIZES = {
    "10M": dict(d_model=384, n_layers=6, n_heads=6, vocab_size=8192),
    "60M": dict(d_model=512, n_layers=8, n_heads=8, vocab_size=32000),
    # SmolLM2-135M's shape (GQA 9/3, tied head, 30 layers): next to the imported model itself
    "135M": dict(
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_ff=1536,
        vocab_size=49152,
        rope_theta=1e5,
        tie_embeddings=True,
    ),
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
    return bench_model(f"llama-{size}", build_model(cfg, seed=0).eval(), args)


def bench_model(name, model, args) -> dict:
    """The methods' tokens/s on `model` (a llama-preset decoder), for each thread count."""
    cfg = model.cfg
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
        f"{name}: {acc['total']:,} parameters ({acc['non_embedding']:,} non-embedding)",
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
            r = time_methods({m: f for m, f in fns.items() if m in args.methods}, prompt, args)
            r = figures(r, model, wbytes)
            row["threads"][str(n)] = r
            print(f"  threads {n}: {json.dumps(r)}", file=sys.stderr)
    return row


def time_methods(fns: dict, prompt: list[int], args) -> dict:
    """Warm up, then time each method `args.repeats` times, interleaved, with a bandwidth figure
    per repeat; the raw figures `figures` turns into the row."""
    t0 = time.perf_counter()
    if "zerolm_compiled" in fns:
        fns["zerolm_compiled"](prompt, min(args.new, 16))  # warm-up, compiling
    compile_s = time.perf_counter() - t0
    for fn in fns.values():
        fn(prompt, min(args.new, 16))  # warm-up
    times, outs, bws = {m: [] for m in fns}, {}, []
    for _ in range(args.repeats):
        bws.append(bandwidth(args.copy_mb))  # within the repeats: it drifts with the machine's load
        for m, fn in fns.items():
            t0 = time.perf_counter()
            outs[m] = fn(prompt, args.new)
            times[m].append(time.perf_counter() - t0)
    assert all(len(o) == args.new for o in outs.values()), {m: len(o) for m, o in outs.items()}
    tps = {m: round(args.new / statistics.median(t), 1) for m, t in times.items()}
    copy_gbs, read_gbs = (statistics.median(b) for b in zip(*bws))
    return dict(tps=tps, outs=outs, compile_s=compile_s, copy_gbs=copy_gbs, read_gbs=read_gbs)


def figures(raw: dict, model, wbytes: int) -> dict:
    """The reported row of one thread count; a figure of a method not run is None."""
    tps, outs = raw["tps"], raw["outs"]
    bound = raw["copy_gbs"] * 1e9 / wbytes
    mv_s, mv_bytes = matvec_seconds(model)

    def ratio(a, b, scale=1.0):  # tps[a] / tps[b] (b None: tps[a]), times scale
        if a not in tps or (b is not None and b not in tps):
            return None
        return round(tps[a] * scale / (1.0 if b is None else tps[b]), 3)

    def same(a, b):
        return outs[a] == outs[b] if a in outs and b in outs else None

    return {
        "threads": torch.get_num_threads(),
        "tok_per_s": tps,
        "ratio": ratio("zerolm_cached", "hf_cached"),
        "ratio_compiled": ratio("zerolm_compiled", "hf_cached"),
        "ratio_nocache": ratio("zerolm_nocache", "hf_nocache"),
        "tokens_match": same("zerolm_cached", "hf_cached"),
        "compiled_tokens_match": same("zerolm_compiled", "hf_cached"),
        "compiled_matches_eager": same("zerolm_compiled", "zerolm_cached"),
        "compile_s": round(raw["compile_s"], 1),
        "nocache_tokens_match": same("zerolm_nocache", "zerolm_cached"),
        "copy_gb_s": round(raw["copy_gbs"], 2),
        "read_gb_s": round(raw["read_gbs"], 2),
        "bound_tok_per_s": round(bound, 1),
        "fraction_of_bound": ratio("zerolm_cached", None, 1 / bound),
        "fraction_of_bound_compiled": ratio("zerolm_compiled", None, 1 / bound),
        "bound_tok_per_s_read": round(raw["read_gbs"] * 1e9 / wbytes, 1),
        "matvec_tok_per_s": round(1 / mv_s, 1),
        "matvec_gb_s": round(mv_bytes / mv_s / 1e9, 2),
        "fraction_of_matvec": ratio("zerolm_cached", None, mv_s),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=128, help="new tokens per generation")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per method (median)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to run")
    ap.add_argument("--sizes", default=",".join(SIZES), help="presets to bench ('' for none)")
    ap.add_argument(
        "--model-dir",
        action="append",
        default=[],
        help="also bench this zerolm model directory (repeatable), e.g. an imported SmolLM2",
    )
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
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
    args.methods = args.methods.split(",")
    if unknown := set(args.methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
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
    for size in filter(None, args.sizes.split(",")):
        result["models"][f"llama-{size}"] = bench_size(size, args)
    for d in args.model_dir:  # its own weights, loaded as `zerolm generate` loads them
        result["models"][d] = bench_model(d, load_model(d), args)
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
