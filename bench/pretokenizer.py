"""Pre-tokenizer benchmark: the patterns a new zerolm BPE tokenizer can train with
(TokenizerConfig.pre: llama.cpp's qwen2 and deepseek-llm, zerolm's older Han-isolating one),
each trained on the bundled Tang and Shakespeare corpora (held-out split as `zerolm prepare`).

Per candidate and corpus: bytes per token on the held-out documents, training seconds (median of
--repeats), and the text one training step covers at the speedrun's 32 x 128 tokens per step
(bytes/token x tokens/step). `ratio` in the summary = candidate / zerolm-han (bytes per token).

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
    """(train, held-out) documents, split by key as zerolm prepare does."""
    docs = [clean_text(d.text) for d in read_corpus(name)]
    val = [d for d in docs if split_key(d) < 0.05] or [min(docs, key=split_key)]
    held = set(val)
    return [d for d in docs if d not in held], val


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--corpora", nargs="+", default=["tang", "shakespeare"])
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
            f"{name}: {len(train)} train / {len(val)} held-out docs, {mb:.1f} MB", file=sys.stderr
        )
        for pre in TRAIN_PRE:
            row = {
                "corpus": name,
                "train_mb": round(mb, 2),
                **measure(pre, train, val, args.vocab, args.repeats),
            }
            rows.setdefault(name, {})[pre] = row
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
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
