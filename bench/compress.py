"""Compression report: every quantized and pruned variant of one model, measured in one run.

Each variant is made by the user's own command (`zerolm quantize` / `zerolm prune`, in a
subprocess, into a temporary folder) from the float model given with --model, then loaded as every
command loads it (load_model) and measured on the same held-out text:
  weight_bytes     bytes of the stored tensors (model.safetensors' state: codes + scales + floats)
  bpb, ppl         bits per byte and perplexity over --eval-tokens held-out tokens (windows of
                   --seq-len), with d_bpb_pct = the change from fp32 in percent
  kl               mean KL(fp32 || variant) of the next-token distributions over the first
                   --positions held-out positions (natural log)
  agree            share of those positions where the variant's greedy token equals fp32's
  decode_b1, decode_b8   tokens/s of greedy decode (--new tokens after a 16-token prompt; batch 8:
                   8 prompts), the compiled decode step (Engine(compile=True)) where it builds,
                   else the eager one (`compiled` says which); best over --threads
  prefill_512      tokens/s of the prefill of one 512-token prompt (eager; best over --threads)
Held-out text: the bundled corpus (--corpus) documents that zerolm's split holds out (split_key <
0.05, as `zerolm prepare` splits them; paragraphs for a corpus of few documents), cut in two by a
second key: one half is the calibration text of gptq / awq / wanda / structured pruning (given as a
file with --calib.data), the other the evaluation text, so no variant is measured on the text it
was calibrated on.

    .venv/bin/python bench/compress.py --model DIR [--corpus tang] [--variants fp32,int8,...]
        [--eval-tokens 16384] [--positions 1024] [--seq-len 512] [--threads 1,2] [--new 64]

Prints one JSON line per variant (stderr: progress) and, last, the summary object with the
Markdown table of the README under "table".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cpu_info  # bench/common.py (scripts run from bench/)

from zerolm.data.clean import clean_text
from zerolm.data.sources import read_corpus
from zerolm.data.split import split_key
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer
from zerolm.transforms.layout import decode_layout

# variant name -> the command and flags that make it from the float model
VARIANTS = {
    "fp32": None,
    "int8": ["quantize", "--method", "int8"],
    "int4": ["quantize", "--method", "int4"],
    "int4-asym": ["quantize", "--method", "int4", "--scheme", "asym"],
    "gptq": ["quantize", "--method", "gptq"],
    "awq": ["quantize", "--method", "awq"],
    "magnitude-50": ["prune", "--method", "magnitude", "--sparsity", "0.5"],
    "wanda-50": ["prune", "--method", "wanda", "--sparsity", "0.5"],
    "wanda-2:4": ["prune", "--method", "wanda", "--pattern", "2:4"],
    "structured-25": ["prune", "--method", "structured", "--ffn-fraction", "0.25"],
    "structured-25-rec": [
        *("prune", "--method", "structured", "--ffn-fraction", "0.25", "--recover-steps", "50"),
    ],
}
CALIBRATED = ("gptq", "awq", "wanda", "structured")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def held_out(corpus: str) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) texts: the corpus's held-out documents, split in two by key.
    A corpus of few documents (Shakespeare has 42) is held out by paragraph instead."""
    docs = [clean_text(d.text) for d in read_corpus(corpus)]
    if len(docs) < 1000:
        docs = [p for d in docs for p in d.split("\n\n") if p.strip()]
    val = [t for t in docs if t and split_key(t) < 0.05]
    calib = [t for t in val if split_key(t, person=b"zerolm-calib") < 0.5]
    return calib, [t for t in val if t not in set(calib)]


def eval_windows(tok: Tokenizer, texts: list[str], seq_len: int, n_tokens: int) -> torch.Tensor:
    """(W, seq_len + 1) windows of the evaluation text's token stream, documents joined by eos."""
    stream: list[int] = []
    eos = tok.eos_id if tok.eos_id is not None else 0
    for t in texts:
        stream += tok.encode(t) + [eos]
        if len(stream) >= n_tokens + seq_len + 1:
            break
    w = min(len(stream) // (seq_len + 1), max(1, n_tokens // seq_len))
    if w == 0:
        raise SystemExit(f"only {len(stream)} held-out tokens: too few for --seq-len {seq_len}")
    return torch.tensor(stream[: w * (seq_len + 1)]).reshape(w, seq_len + 1)


def make_variant(name: str, src: str, calib_file: str, root: str) -> str:
    if VARIANTS[name] is None:
        return src
    out = os.path.join(root, name.replace(":", "-"))
    cmd = [sys.executable, "-m", "zerolm", *VARIANTS[name], src, "--out", out]
    if any(name.startswith(c) for c in CALIBRATED):
        cmd += [f"--calib.data={calib_file}"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    log(f"{name}: made in {time.perf_counter() - t:.1f} s")
    return out


@torch.inference_mode()
def quality(model, windows, token_bytes, ref_logp, positions: int) -> tuple[dict, torch.Tensor]:
    """bpb / ppl over all windows; KL and greedy agreement against ref_logp (or, for fp32 itself,
    its log-probs returned to be the reference) over the first `positions` predictions."""
    nats, nbytes, n = 0.0, 0, 0
    logps = []
    for x in windows:
        logits = model(x[None, :-1])[0].float()  # (T, V)
        logp = F.log_softmax(logits, -1)
        y = x[1:]
        nats += -logp.gather(1, y[:, None]).sum().item()
        nbytes += int(token_bytes[y].sum())
        n += y.numel()
        if sum(t.shape[0] for t in logps) < positions:
            logps.append(logp)
    mine = torch.cat(logps)[:positions]
    out = {"bpb": nats / math.log(2) / nbytes, "ppl": math.exp(nats / n), "eval_tokens": n}
    if ref_logp is not None:
        kl = F.kl_div(mine, ref_logp, log_target=True, reduction="none").sum(-1)
        out["kl"] = kl.mean().item()
        out["agree"] = (mine.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
    return out, mine


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (and the compile, for the compiled step)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(model, prompts, new: int, threads: list[int], repeats: int) -> dict:
    """Best tokens/s over thread counts: batch-1 and batch-8 decode, prefill of 512 tokens."""
    req = GenerateRequest(max_new_tokens=new, sampling=SamplingParams(temperature=0.0))
    best: dict = {"decode_b1": 0.0, "decode_b8": 0.0, "prefill_512": 0.0}
    with tempfile.TemporaryDirectory() as programs:
        try:
            engine, compiled = Engine(model, compile=True, program_dir=programs), True
            engine.generate([prompts[0][:16]], GenerateRequest(max_new_tokens=2))
        except Exception as e:  # report, and fall back to the eager step
            log(f"  compiled decode unavailable ({type(e).__name__}: {str(e)[:120]}); eager")
            engine, compiled = Engine(model), False
        eager, first = Engine(model), GenerateRequest(max_new_tokens=1)
        for th in threads:
            torch.set_num_threads(th)
            b1 = _timed(lambda: engine.generate([prompts[0][:16]], req), repeats)
            b8 = _timed(lambda: engine.generate([p[:16] for p in prompts[:8]], req), repeats)
            pre = _timed(lambda: eager.generate([prompts[0][:512]], first), repeats)
            row = {"decode_b1": new / b1, "decode_b8": 8 * new / b8, "prefill_512": 512 / pre}
            log(f"  {th} thread(s): " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
            for k, v in row.items():
                if v > best[k]:
                    best[k], best[k + "_threads"] = v, th
    return {**best, "compiled": compiled}


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _fig(row: dict, key: str, digits: int = 1) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "–"  # not timed


def table(rows: list[dict]) -> str:
    head = (
        "| variant | weight MB | bpb (Δ %) | ppl | KL | greedy agree | decode b1 | decode b8 "
        "| prefill 512 |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['variant']} | {r['weight_bytes'] / 1e6:.1f} "
        f"| {r['bpb']:.4f} ({r['d_bpb_pct']:+.2f}) | {r['ppl']:.2f} | {r.get('kl', 0):.4f} "
        f"| {r.get('agree', 1) * 100:.1f} % | {_fig(r, 'decode_b1')} "
        f"| {_fig(r, 'decode_b8')} | {_fig(r, 'prefill_512', 0)} |\n"
        for r in rows
    )
    return head + body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="a float zerolm model directory")
    ap.add_argument("--corpus", default="tang", help="bundled corpus for held-out text")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-speed", action="store_true", help="quality figures only")
    ap.add_argument("--speed-variants", default="", help="time only these ('': every variant)")
    args = ap.parse_args()
    names = ["fp32"] + [n for n in args.variants.split(",") if n != "fp32"]  # fp32: the reference
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    threads = [int(t) for t in args.threads.split(",")]
    tok = Tokenizer.load(args.model)
    token_bytes = torch.from_numpy(tok.token_byte_lengths())
    calib, evaluation = held_out(args.corpus)
    seq_len = min(args.seq_len, load_model(args.model).cfg.max_seq_len - 1)
    windows = eval_windows(tok, evaluation, seq_len, args.eval_tokens)
    prompts = [w.tolist() for w in eval_windows(tok, evaluation[::-1], 512, 8 * 512)]
    log(f"{len(calib)} calibration / {len(evaluation)} evaluation texts; windows {windows.shape}")
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as root:
        calib_file = os.path.join(root, "calib.txt")
        Path(calib_file).write_text("\n\n".join(calib), encoding="utf-8")
        for name in names:
            path = make_variant(name, args.model, calib_file, root)
            model = load_model(path).eval()
            q, logp = quality(model, windows, token_bytes, ref, args.positions)
            if name == "fp32":
                ref, base_bpb = logp, q["bpb"]
            row = {"variant": name, "weight_bytes": weight_bytes(model), **q}
            row["d_bpb_pct"] = 100 * (q["bpb"] / base_bpb - 1)
            timed = not args.speed_variants or name in args.speed_variants.split(",")
            if not args.no_speed and timed:
                decode_layout(model)  # as `zerolm generate` runs it: fused q/k/v and gate/up
                row.update(speed(model, prompts, args.new, threads, args.repeats))
            if name == "fp32":
                base_row = row
            row["ratio"] = {  # to fp32: bits per byte, and the speed-ups
                k: round(row[k] / base_row[k], 4)
                for k in ("bpb", "decode_b1", "decode_b8", "prefill_512")
                if k in row and k in base_row
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {
        "bench": "compress",
        "model": args.model,
        "corpus": args.corpus,
        **cpu_info(),
        "torch": torch.__version__,
        "threads": threads,
        "load_avg": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "variants": rows,
        "table": table(rows),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
