"""One huge document (a single-line .txt of many MB): same tokens as a whole encode, bounded
memory."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from zerolm.data.dedup import NearDedup, shingle_hashes

_rng = random.Random(0)
_WORDS = ["".join(_rng.choice("abcdefghij") for _ in range(_rng.randint(1, 7))) for _ in range(300)]


def _long_text(n_words: int) -> str:
    """Words, punctuation, digits, Han characters, line breaks, runs of spaces and special-token
    spellings."""
    extras = [",", ".", " 2024", "\n", "\n\n", "   ", "床前明月光，", "<|eos|>", "it's", "\t"]
    rng = random.Random(n_words)  # the same text whatever the test order
    return " ".join(
        rng.choice(_WORDS) + (rng.choice(extras) if rng.random() < 0.2 else "")
        for _ in range(n_words)
    )


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "char"])
def test_a_long_document_is_encoded_in_pieces_to_exactly_the_whole_documents_ids(
    kind, tiny_tokenizer
):
    text = _long_text(120_000)  # ~600k characters: many pieces and several batches
    tok = tiny_tokenizer(kind, [text[:50_000]], vocab_size=400)
    short = ["床前明月光", "a b", "x" * 10]
    got = list(tok.encode_stream([short[0], text, *short[1:]], max_chars=1 << 14))
    assert [t for t, _ in got] == [short[0], text, *short[1:]]
    for t, ids in got:
        assert list(ids) == tok.encode(t)
    sizes = [0, 1, 50, 3000, 9000]
    mixed = [text[i : i + sizes[i % 5]] for i in range(0, 400_000, 2001)]  # batches flush mid-text
    got = list(tok.encode_stream(mixed, max_docs=7, max_chars=4096))
    assert [t for t, _ in got] == mixed and all(list(ids) == tok.encode(t) for t, ids in got)


def test_minhash_of_a_long_document_equals_minhash_over_its_distinct_shingles():
    text = _long_text(40_000)
    d = NearDedup(num_perm=64)
    sh = shingle_hashes(text, 5)
    assert len(sh) == len(np.unique(sh)) > 20_000
    want = (
        ((sh[:, None] * d.a[None, :] + d.b[None, :]) >> np.uint64(32)).min(axis=0).astype(np.uint32)
    )
    assert (d.signature(text) == want).all()
    assert (
        list(shingle_hashes("", 5)) == [1] and len(shingle_hashes("abc", 5)) == 1
    )  # short texts: one shingle


_CHILD = """
import json, resource, sys
from zerolm.config import load_config
from zerolm.data.prepare import prepare
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = load_config(None, {"out_dir": sys.argv[2],
                         "data": {"inputs": [sys.argv[1]], "val_fraction": 0.0},
                         "tokenizer": {"vocab_size": 300}})
summary = prepare(cfg, progress=False)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"grown_kb": grown, "tokens": summary["shards"]["splits"]["train"]["tokens"]}))
"""


@pytest.mark.slow  # ~15 s: the file must be large enough for the old ~170x growth to show
def test_preparing_a_single_line_file_keeps_memory_bounded(tmp_path):
    # Before: the shards stage encoded the whole line in one call (~110 bytes per token in HF
    # Encodings) and near-dedup held 8-byte hashes per character: 5 MB grew ~850 MB (~170x), 20 MB
    # peaked at 4.6 GB. Now 5 MB grows ~90 MB (~18x): the str copies of the document while cleaning.
    src = tmp_path / "one.txt"
    parts, n, rng = [], 0, random.Random(5)
    while n < 5_000_000:
        parts.append(rng.choice(_WORDS) + rng.choice(["", "", ",", "."]))
        n += len(parts[-1]) + 1
    src.write_text(" ".join(parts) + "\n", encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] > 500_000
    assert out["grown_kb"] * 1024 < 40 * src.stat().st_size, out


def test_a_huge_run_without_a_pretoken_start_is_cut_and_still_round_trips(tiny_tokenizer):
    tok = tiny_tokenizer("bpe", ["a b  c   d"])
    text = "a" + " " * 300_000 + "b"
    ((_, ids),) = tok.encode_stream(
        [text], max_chars=1 << 14
    )  # cut every 8,192 characters of the run
    assert tok.decode(ids) == text
    assert (
        abs(len(ids) - len(tok.encode(text))) <= 300_000 // 8192 + 1
    )  # at most one token more per cut
