"""Tokenizer benchmark: training and encoding throughput on the bundled corpora, and compression
(bytes/token) on held-out Chinese and English text.

Reference, measured in the same run: the stock byte-level BPE of the `tokenizers` library (GPT-2's
pre-tokenizer, which keeps a whole run of Han characters as one pre-token), trained with the same
vocabulary size on the same text. `ratio` = zerolm / reference.

    .venv/bin/python bench/tokenizer.py [--repeats 3] [--vocab 8192]

Prints progress to stderr and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial

import tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from zerolm.config import TokenizerConfig
from zerolm.data.clean import clean_text
from zerolm.data.sources import read_corpus
from zerolm.data.split import split_key
from zerolm.tokenizer import SPECIAL_TOKENS
from zerolm.tokenizer.train import train_tokenizer


def reference_bpe(texts, vocab):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_each(tok, texts):
    return [tok.encode(t) for t in texts]


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    result = {
        "bench": "tokenizer",
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
            "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "all"),
            "loadavg_start": os.getloadavg()[0],
        },
        "repeats": args.repeats,
        "vocab_size": args.vocab,
        "corpora": {},
    }
    for name, lang in (("tang", "zh"), ("shakespeare", "en")):
        docs = [clean_text(d.text) for d in read_corpus(name)]
        train = [d for d in docs if split_key(d) >= 0.05]
        val = [d for d in docs if split_key(d) < 0.05] or [
            min(docs, key=split_key)
        ]  # as zerolm prepare does
        train = [d for d in train if d not in val]
        mb_train = sum(len(d.encode()) for d in train) / 1e6
        mb_all = sum(len(d.encode()) for d in docs) / 1e6
        val_bytes = sum(len(d.encode()) for d in val)
        print(f"{name}: {len(docs)} docs, {mb_all:.1f} MB; training...", file=sys.stderr)
        cfg = TokenizerConfig(kind="bpe", vocab_size=args.vocab)
        t_ours, ours = timed(partial(train_tokenizer, cfg, train, progress=False), args.repeats)
        t_ref, ref = timed(partial(reference_bpe, train, args.vocab), args.repeats)
        t_enc, _ = timed(partial(ours.encode_batch, docs), args.repeats)
        t_enc_ref, _ = timed(
            partial(ref.encode_batch, docs, add_special_tokens=False), args.repeats
        )
        t_enc1, _ = timed(partial(encode_each, ours, docs[:2000]), args.repeats)
        mb_1 = sum(len(d.encode()) for d in docs[:2000]) / 1e6
        tok_ours = sum(len(ids) for ids in ours.encode_batch(val))
        tok_ref = sum(len(e.ids) for e in ref.encode_batch(val, add_special_tokens=False))
        bpt, bpt_ref = val_bytes / tok_ours, val_bytes / tok_ref
        result["corpora"][name] = {
            "language": lang,
            "documents": len(docs),
            "mb": round(mb_all, 2),
            "val_documents": len(val),
            "train_mb_per_s": round(mb_train / t_ours, 2),
            "train_mb_per_s_reference": round(mb_train / t_ref, 2),
            "train_ratio": round(t_ref / t_ours, 3),
            "encode_batch_mb_per_s": round(mb_all / t_enc, 2),
            "encode_batch_mb_per_s_reference": round(mb_all / t_enc_ref, 2),
            "encode_ratio": round(t_enc_ref / t_enc, 3),
            "encode_serial_mb_per_s": round(mb_1 / t_enc1, 2),
            "val_bytes_per_token": round(bpt, 3),
            "val_bytes_per_token_reference": round(bpt_ref, 3),
            "val_chars_per_token": round(sum(map(len, val)) / tok_ours, 3),
            "bytes_per_token_ratio": round(bpt / bpt_ref, 3),
        }
        print(json.dumps(result["corpora"][name]), file=sys.stderr)
    result["machine"]["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
