"""Token shards: each split is a list of flat uint16/uint32 `.bin` files (documents back to back,
each followed by eos) plus `.idx.npy` document start offsets, described by `meta.json`.

Readers memory-map the `.bin` files, so a corpus larger than RAM trains with bounded memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from zerolm.files import atomic_write_text

META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Append tokenized documents of one split; rolls to a new file past `shard_tokens`."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, eos_id: int, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.eos = out_dir, split, dtype, eos_id
        self.shard_tokens = shard_tokens
        self.files: list[dict] = []
        self._f: BinaryIO | None = None
        self._starts: list[int] = []
        self._pos = 0

    def _roll(self):
        self._close()
        name = f"{self.split}-{len(self.files):05d}"
        self.files.append(
            {"bin": f"{name}.bin", "idx": f"{name}.idx.npy", "tokens": 0, "documents": 0}
        )
        self._f = open(self.out_dir / f"{name}.bin", "wb")
        self._starts, self._pos = [], 0

    def _close(self):
        if self._f is None:
            return
        self._f.close()
        entry = self.files[-1]
        np.save(self.out_dir / entry["idx"], np.array(self._starts + [self._pos], dtype=np.int64))
        entry["tokens"], entry["documents"] = self._pos, len(self._starts)
        self._f = None

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        if self._f is None or (self._pos and self._pos + len(ids) + 1 > self.shard_tokens):
            self._roll()
        assert self._f is not None  # _roll opened the next file
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = self.eos
        self._f.write(arr.tobytes())
        self._starts.append(self._pos)
        self._pos += len(arr)

    def finish(self) -> list[dict]:
        self._close()
        return self.files


def write_meta(out_dir: Path, meta: dict) -> None:
    atomic_write_text(out_dir / META, json.dumps(meta, indent=2, ensure_ascii=False))


@dataclass
class Split:
    """A memory-mapped split: `tokens[i]` is shard i; `starts[i]` its document offsets (+ end)."""

    tokens: list[np.memmap]
    starts: list[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def num_documents(self) -> int:
        return sum(len(s) - 1 for s in self.starts)

    def documents(self):
        """Yield each document's token ids (without its trailing eos)."""
        for toks, starts in zip(self.tokens, self.starts):
            for a, b in zip(starts[:-1], starts[1:]):
                yield toks[a : b - 1]


def load_meta(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / META
    if not path.is_file():
        raise ValueError(
            f"no {META} in {str(shard_dir)!r}: run `zerolm prepare` to make shards first"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def open_split(shard_dir: str | Path, split: str = "train") -> Split:
    shard_dir = Path(shard_dir)
    meta = load_meta(shard_dir)
    if split not in meta["splits"]:
        raise ValueError(f"split {split!r} not in {shard_dir}; splits: {', '.join(meta['splits'])}")
    dtype = np.dtype(meta["dtype"])
    tokens, starts = [], []
    for f in meta["splits"][split]["files"]:
        tokens.append(np.memmap(shard_dir / f["bin"], dtype=dtype, mode="r"))
        starts.append(np.load(shard_dir / f["idx"], allow_pickle=False))
    return Split(tokens, starts)
