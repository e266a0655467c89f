"""Quantized decode against llama.cpp, in one run, on the same weights: batch-1 greedy decode
tokens/s of one model (SmolLM2-135M: `zerolm import --from hf DIR --out OUT`) as fp32, int8 and
int4, in zerolm and in llama.cpp, each at its best thread count.

  zerolm     Engine(compile=True) on `quantize_model(model, QuantConfig(method, group=32))`
             (RTN; the tied head/embedding int8) in its decode layout: the decode step compiled by
             AOTInductor with the quantized-linear op (torch.ops.zerolm.qlinear) inside, as
             `zerolm generate --compile` runs it. tokens/s = --new ÷ wall time of the whole call
             (a --prompt-token prefill included), median of --repeats after a warm-up.
  llama.cpp  `llama-bench -p 0 -n NEW -r REPEATS` (generation only) on the GGUF that
             `zerolm export --format gguf` writes of that very quantized model: its blocks are
             copied, so both engines read the same codes and scales (fp32: F32; int8: Q8_0;
             int4: Q4_0 matrices, Q8_0 embedding). llama.cpp is the llama-cpp-python 0.3.36
             sdist's, built by scripts/build_llama_cpp.sh (GGML_NATIVE).
`ratio` = zerolm best ÷ llama.cpp best, per variant (the issue's targets: int8 and int4 ≥ 1, floor
0.8). Bandwidth bound: the bytes of weights one step reads (every matrix as stored, the head
whole, the input embedding one row) ÷ copy bandwidth (bench/decode.py's convention, measured in
this run); `fraction_of_bound` per engine. Progress on stderr; the last line is one JSON object.

    .venv/bin/python bench/qdecode.py --model-dir OUT [--new 128] [--threads 1,2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
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

HERE = Path(__file__).resolve().parent
# bench/gguf.py would shadow the gguf package: this folder goes last on the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from common import cpu_info  # noqa: E402
from decode import bandwidth, zerolm_cached  # noqa: E402

from zerolm.config import QuantConfig  # noqa: E402
from zerolm.infer.engine import Engine  # noqa: E402
from zerolm.interop.gguf_export import export_gguf  # noqa: E402
from zerolm.model import load_model  # noqa: E402
from zerolm.quant import kernels  # noqa: E402
from zerolm.quant.linear import QuantLinear  # noqa: E402
from zerolm.tokenizer import Tokenizer  # noqa: E402
from zerolm.transforms.layout import decode_layout  # noqa: E402
from zerolm.transforms.quantize import quantize_model  # noqa: E402

CACHE = Path(os.environ.get("ZEROLM_TEST_CACHE", Path.home() / ".cache" / "zerolm-test"))
LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN") or CACHE / "llama.cpp-0.3.36" / "bin")
VARIANTS = {"fp32": None, "int8": "int8", "int4": "int4"}
GGUF_TYPE = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}


def step_bytes(model) -> int:
    """Bytes of weights one decode step reads: every matrix as stored (codes + scales + mins),
    norms and biases, the head whole; an untied input embedding only one row."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.nbytes()
        else:
            total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
    emb = model.tok_emb
    if model.lm_head is not None:  # untied: the lookup reads one row of the input table
        if isinstance(emb, QuantLinear):
            size, rows = emb.nbytes(), emb.out_features
        else:
            size, rows = emb.weight.numel() * emb.weight.element_size(), emb.weight.shape[0]
        total -= size - size // rows
    return total


def llama_bench(files: dict[str, Path], threads: list[int], new: int, repeats: int) -> dict:
    """{variant: {threads: tok/s}} from one llama-bench call over every file and thread count."""
    cmd = [str(LLAMA_BIN / "llama-bench"), "-p", "0", "-n", str(new), "-r", str(repeats)]
    cmd += ["-t", ",".join(map(str, threads)), "-o", "json"]
    for f in files.values():
        cmd += ["-m", str(f)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"llama-bench failed:\n{res.stderr[-2000:]}")
    by_file = {str(f): v for v, f in files.items()}
    out: dict[str, dict[str, float]] = {v: {} for v in files}
    for r in json.loads(res.stdout):
        out[by_file[r["model_filename"]]][str(r["n_threads"])] = round(r["avg_ts"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True, help="a float zerolm model directory")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-llama", action="store_true", help="zerolm only")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    names = args.variants.split(",")
    if not kernels.load():
        print("warning: the qlinear op is not built: the pure-torch path is timed", file=sys.stderr)
    if not args.no_llama and not (LLAMA_BIN / "llama-bench").is_file():
        raise SystemExit(f"no llama-bench in {LLAMA_BIN}: run scripts/build_llama_cpp.sh")
    base = load_model(args.model_dir).eval()
    tok = Tokenizer.load(args.model_dir)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, base.cfg.vocab_size, (args.prompt,), generator=gen).tolist()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, Path] = {}
        for name in names:
            m = copy.deepcopy(base)
            if VARIANTS[name]:
                m = quantize_model(m, QuantConfig(method=VARIANTS[name], group=32))
            dtype = None if VARIANTS[name] else "f32"  # quantized: its blocks copied as stored
            files[name] = export_gguf(m, Path(tmp) / f"{name}.gguf", tok, dtype)
            decode_layout(m)
            row: dict = {"weight_bytes_per_token": step_bytes(m), "zerolm": {}, "compile_s": {}}
            outs = {}
            for n in threads:
                torch.set_num_threads(n)
                eng = Engine(m, compile=True, program_dir=tmp)
                t0 = time.perf_counter()
                zerolm_cached(eng, prompt, 16)  # warm-up, compiling for this thread count
                row["compile_s"][str(n)] = round(time.perf_counter() - t0, 1)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    outs[n] = zerolm_cached(eng, prompt, args.new)
                    times.append(time.perf_counter() - t0)
                row["zerolm"][str(n)] = round(args.new / statistics.median(times), 1)
            row["same_tokens_across_threads"] = len({tuple(o) for o in outs.values()}) == 1
            rows[name] = row
            print(name, json.dumps(row), file=sys.stderr, flush=True)
        copy_gbs = statistics.median(bandwidth(256)[0] for _ in range(3))
        llama = {} if args.no_llama else llama_bench(files, threads, args.new, args.repeats)
        for name, row in rows.items():
            bound = copy_gbs * 1e9 / row["weight_bytes_per_token"]
            row["bound_tok_per_s"] = round(bound, 1)
            z = max(row["zerolm"].values())
            row["zerolm_best"] = z
            row["zerolm_fraction_of_bound"] = round(z / bound, 3)
            row["gguf_type"] = GGUF_TYPE[name]
            row["gguf_bytes"] = files[name].stat().st_size
            if name in llama:
                row["llama_cpp"] = llama[name]
                lb = max(llama[name].values())
                row["llama_cpp_best"] = lb
                row["llama_cpp_fraction_of_bound"] = round(lb / bound, 3)
                row["ratio"] = round(z / lb, 3)
    print(
        json.dumps(
            {
                "bench": "qdecode",
                "machine": {
                    **cpu_info(),
                    "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "loadavg": os.getloadavg(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
                    "qlinear_op": kernels.load(),
                },
                "model": args.model_dir,
                "new_tokens": args.new,
                "prompt_tokens": args.prompt,
                "repeats": args.repeats,
                "threads": threads,
                "copy_gb_s": round(copy_gbs, 2),
                "variants": rows,
                "ratio": {n: r.get("ratio") for n, r in rows.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
