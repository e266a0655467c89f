"""Pre-tokenizer benchmark: the patterns a new zerolm BPE tokenizer can train with
(TokenizerConfig.pre: llama.cpp's qwen2 and deepseek-llm, zerolm's older Han-isolating one),
each trained on the bundled Tang and Shakespeare corpora (5 % of paragraphs held out by key).

Per candidate and corpus: bytes per token on the held-out paragraphs, training seconds (median of
--repeats), and the text one training step covers at the speedrun's 32 x 128 tokens per step
(bytes/token x tokens/step). `ratio` in the summary = candidate / zerolm-han (bytes per token).
--pretrain-steps N adds a short same-seed speedrun pretraining (Tang) per candidate: validation
bits per byte (comparable across tokenizers: the same held-out text, in bytes).

    OMP_NUM_THREADS=1 .venv/bin/python bench/pretokenizer.py [--repeats 3] [--vocab 8192]

Prints one JSON line per candidate and corpus, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import tokenizers

from zerolm.config import TokenizerConfig
from zerolm.data.clean import clean_text
from zerolm.data.sources import read_corpus
from zerolm.data.split import split_key
from zerolm.tokenizer.pretok import TRAIN_PRE
from zerolm.tokenizer.train import train_tokenizer

TOKENS_PER_STEP = 32 * 128  # recipes/speedrun.toml: batch_size x max_seq_len
BASELINE = "zerolm-han"


def split_docs(name: str) -> tuple[list[str], list[str]]:
    """(train, held-out) paragraphs (blank-line separated: Shakespeare has only 42 documents),
    split by key as zerolm prepare splits documents."""
    paras = [p for d in read_corpus(name) for p in clean_text(d.text).split("\n\n") if p.strip()]
    val = [p for p in paras if split_key(p) < 0.05]
    held = set(val)
    return [p for p in paras if p not in held], val


def measure(pre: str, train: list[str], val: list[str], vocab: int, repeats: int) -> dict:
    cfg = TokenizerConfig(kind="bpe", vocab_size=vocab, pre=pre)
    times, tok = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        tok = train_tokenizer(cfg, train, progress=False)
        times.append(time.perf_counter() - t0)
    assert tok is not None
    val_bytes = sum(len(d.encode()) for d in val)
    val_tokens = sum(len(ids) for ids in tok.encode_batch(val))
    bpt = val_bytes / val_tokens
    return {
        "pre": pre,
        "val_bytes_per_token": round(bpt, 3),
        "val_tokens": val_tokens,
        "train_s": round(statistics.median(times), 2),
        "train_s_all": [round(t, 2) for t in times],
        "bytes_per_step": round(bpt * TOKENS_PER_STEP),
    }


def pretrain_bpb(pre: str, steps: int, out: str) -> dict:
    """A short same-seed speedrun pretraining (Tang) with this pre-tokenizer: validation bits
    per byte on the whole held-out split, and the step time."""
    from zerolm.api import fit

    t0 = time.perf_counter()
    over = {"train.steps": steps, "train.eval_every": steps, "train.ckpt_every": steps}
    over |= {"train.compile": False, "train.resume": False}  # eager: no compile time in the figure
    over |= {"train.warmup_steps": min(50, steps // 4), "tokenizer.pre": pre, "out_dir": out}
    result = fit("zerolm/recipes/speedrun.toml", progress=False, **over)
    return {
        "pre": pre,
        "pretrain_steps": steps,
        "val_bpb": round(result.final["val_bpb"], 4),
        "pretrain_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--corpora", nargs="*", default=["tang", "shakespeare"])
    ap.add_argument("--pretrain-steps", type=int, default=0, help="0: no pretraining comparison")
    ap.add_argument("--pretrain-pre", nargs="*", default=list(TRAIN_PRE))
    ap.add_argument("--out", default="runs/bench-pretokenizer")
    args = ap.parse_args()
    machine = {
        "cores": os.cpu_count(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "all"),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "loadavg_start": os.getloadavg()[0],
    }
    rows: dict[str, dict[str, dict]] = {}
    for name in args.corpora:
        train, val = split_docs(name)
        mb = sum(len(d.encode()) for d in train) / 1e6
        print(
            f"{name}: {len(train)} train / {len(val)} held-out paragraphs, {mb:.1f} MB",
            file=sys.stderr,
        )
        for pre in TRAIN_PRE:
            row = {
                "corpus": name,
                "train_mb": round(mb, 2),
                **measure(pre, train, val, args.vocab, args.repeats),
            }
            rows.setdefault(name, {})[pre] = row
            print(json.dumps(row), flush=True)
    pretrain = [
        pretrain_bpb(pre, args.pretrain_steps, f"{args.out}/{pre}")
        for pre in args.pretrain_pre
        if args.pretrain_steps
    ]
    for row in pretrain:
        print(json.dumps(row), flush=True)
    summary = {
        "bench": "pretokenizer",
        "vocab_size": args.vocab,
        "repeats": args.repeats,
        "tokens_per_step": TOKENS_PER_STEP,
        "machine": {**machine, "loadavg_end": os.getloadavg()[0]},
        "ratio": {
            name: {
                p: round(r["val_bytes_per_token"] / by[BASELINE]["val_bytes_per_token"], 3)
                for p, r in by.items()
            }
            for name, by in rows.items()
            if BASELINE in by
        },
        "val_bpb": {r["pre"]: r["val_bpb"] for r in pretrain},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
