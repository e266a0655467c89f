"""Exact and near-duplicate detection, streaming: memory grows with the number of documents kept
(16 bytes each for exact, 4·num_perm bytes for near), never with their text.

Near duplicates: MinHash over character shingles (lowercased, whitespace collapsed), with
locality-sensitive hashing over bands to find candidates; a candidate is a duplicate when the
estimated Jaccard similarity (share of equal MinHash values) reaches the threshold.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WS = re.compile(r"\s+")
_P = np.uint64(1099511628211)  # FNV prime: rolling polynomial hash of code points


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _shingle_blocks(text: str, n: int, block: int = 1 << 16):
    """Distinct 64-bit hashes of the character n-grams of the normalised text, block by block
    (a hash may recur across blocks): memory is bounded by the block, not by the document."""
    norm = _WS.sub(" ", text.lower()).strip()
    n = min(n, max(len(norm), 1))  # a text shorter than n is one shingle
    for start in range(0, max(len(norm) - n + 1, 1), block):
        seg = norm[start : start + block + n - 1]
        cps = np.frombuffer(seg.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        cps = cps if len(cps) else np.zeros(1, np.uint64)  # the empty text: one shingle, as before
        m = len(cps) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                h = h * _P + cps[k : k + m] + np.uint64(1)
        yield np.unique(h)


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Distinct 64-bit hashes of the character n-grams of the normalised text."""
    return np.unique(np.concatenate(list(_shingle_blocks(text, n))))


def choose_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows), bands*rows == num_perm, with the LSH S-curve midpoint (1/b)^(1/r) as high as
    possible but at least 0.05 below the threshold: near-duplicates become candidates with high
    probability (misses are the costly error; extra candidates are verified and only cost time)."""
    options = [(num_perm // r, r) for r in range(1, num_perm + 1) if num_perm % r == 0]
    ok = [(b, r) for b, r in options if (1 / b) ** (1 / r) <= threshold - 0.05]
    return max(ok, key=lambda br: (1 / br[0]) ** (1 / br[1])) if ok else options[0]


class NearDedup:
    """MinHash-LSH index: `is_duplicate(text)` answers and, if new, remembers the document."""

    def __init__(
        self, num_perm: int = 128, threshold: float = 0.8, shingle: int = 5, seed: int = 0
    ):
        rng = np.random.default_rng(seed)
        # multiply-shift universal hashing on 64-bit words: (a*x + b) >> 32, a odd
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.threshold, self.shingle, self.num_perm = threshold, shingle, num_perm
        self.bands, self.rows = choose_bands(num_perm, threshold)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.sigs = np.zeros((1024, num_perm), dtype=np.uint32)
        self.count = 0

    def signature(self, text: str) -> np.ndarray:
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for sh in _shingle_blocks(text, self.shingle):  # a min is the same over repeats
                for i in range(0, len(sh), 8192):  # bounded (8192, num_perm) working set
                    block = (
                        sh[i : i + 8192, None] * self.a[None, :] + self.b[None, :]
                    ) >> np.uint64(32)
                    np.minimum(sig, block.min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def is_duplicate(self, text: str) -> bool:
        sig = self.signature(text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {j for band, key in zip(self.buckets, keys) for j in band.get(key, ())}
        if candidates:
            idx = np.fromiter(candidates, dtype=np.int64)
            similarity = (self.sigs[idx] == sig[None, :]).mean(axis=1)
            if similarity.max() >= self.threshold:
                return True
        if self.count == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.zeros_like(self.sigs)])
        self.sigs[self.count] = sig
        for band, key in zip(self.buckets, keys):
            band.setdefault(key, []).append(self.count)
        self.count += 1
        return False
