"""Batches for next-token pretraining, read from memory-mapped token shards.

A split's shard files form one token stream; every document already ends with eos, so a window
may span documents and the model learns to see eos between them. Window i is the tokens
[i*T, i*T + T + 1): x is its first T tokens, y its last T (x shifted by one).

Legend: B batch rows, T sequence length.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch

from zerolm.data.shards import open_split


class _Stream:
    """The split's shard memmaps seen as one flat array; reads copy only the requested tokens."""

    def __init__(self, shard_dir: str | Path, split: str):
        self.shards = [t for t in open_split(shard_dir, split).tokens if len(t)]
        self.bounds = np.cumsum(
            [0] + [len(t) for t in self.shards]
        )  # shard i is [bounds[i], bounds[i+1])
        self.num_tokens = int(self.bounds[-1])

    def read(self, starts: np.ndarray, length: int) -> torch.Tensor:
        """Tokens [s, s + length) for each start s, as a (len(starts), length) int64 tensor."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, s in enumerate(starts.tolist()):
            i, filled = int(np.searchsorted(self.bounds, s, side="right")) - 1, 0
            while filled < length:  # a window crossing a file boundary continues in the next shard
                a = s + filled - int(self.bounds[i])
                piece = self.shards[i][a : a + length - filled]
                out[row, filled : filled + len(piece)] = piece
                filled, i = filled + len(piece), i + 1
        return torch.from_numpy(out)


def _check(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(
            f"batch_size and seq_len must be >= 1, got batch_size={batch_size}, seq_len={seq_len}"
        )


def _pair(buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T), (B, T)


class TokenBatches:
    """Infinite iterator of shuffled (x, y) int64 batches, each (batch_size, seq_len).

    Each epoch draws a fresh permutation of the n_windows = (tokens - 1) // seq_len windows,
    seeded by (seed, epoch); batches are consecutive groups of batch_size windows from it, the
    incomplete tail dropped. With world_size > 1, rank r takes batches r, r + world_size, ...;
    every rank yields `steps_per_epoch` batches per epoch, so ranks stay in step.
    `state_dict()` / `load_state_dict()` resume exactly, in O(1).
    """

    def __init__(
        self,
        shard_dir: str | Path,
        split: str = "train",
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check(batch_size, seq_len)
        if not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        self.stream = _Stream(shard_dir, split)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.n_windows = max(self.stream.num_tokens - 1, 0) // seq_len
        self.steps_per_epoch = self.n_windows // batch_size // world_size
        if self.steps_per_epoch == 0:
            need = batch_size * world_size * seq_len + 1
            ranks = f" x world_size {world_size}" if world_size > 1 else ""
            raise ValueError(
                f"split {split!r} in {str(shard_dir)!r} has {self.stream.num_tokens} tokens, but "
                f"one batch needs {need} (batch_size {batch_size} x seq_len {seq_len}{ranks} + 1); "
                "use a smaller --train.batch_size or --model.max_seq_len, or add more data"
            )
        self.epoch, self.step = 0, 0  # step: batches this rank has taken in the current epoch
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:  # one permutation per epoch, cached
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n_windows), self.epoch
        return self._perm

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        g = self.step * self.world_size + self.rank  # global batch index in this epoch
        windows = self._permutation()[g * self.batch_size : (g + 1) * self.batch_size]  # (B,)
        self.step += 1
        return _pair(self.stream.read(windows * self.seq_len, self.seq_len + 1))  # (B, T), (B, T)

    def state_dict(self) -> dict:
        """Position as plain ints: the epoch and the batches taken in it by all ranks together."""
        return {"epoch": self.epoch, "batch": self.step * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state_dict()` was taken (with the same world size)."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise ValueError(f"invalid loader state {state!r}: epoch and batch must be >= 0")
        self.epoch, self.step = epoch, batch // self.world_size


def eval_batches(
    shard_dir: str | Path,
    split: str = "val",
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential (x, y) int64 batches over a split, no shuffling, for validation loss.

    Full windows come in batches of batch_size rows (the last one may have fewer); the tokens left
    after the last full window come as a final (1, r) batch with r < seq_len, so every token but the
    first is a target exactly once. Average losses weighted by y.numel(). Stops after max_batches.
    """
    _check(batch_size, seq_len)  # checked here, not lazily at the first next()
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 or None, got {max_batches}")
    return _sequential(_Stream(shard_dir, split), batch_size, seq_len, max_batches)


def _sequential(stream: _Stream, batch_size: int, seq_len: int, max_batches: int | None):
    n_windows, rest = divmod(max(stream.num_tokens - 1, 0), seq_len)
    batches = (
        (i, min(batch_size, n_windows - i), seq_len) for i in range(0, n_windows, batch_size)
    )
    tail = [(n_windows, 1, rest)] if rest else []
    for first, rows, length in islice(chain(batches, tail), max_batches):
        starts = np.arange(first, first + rows, dtype=np.int64) * seq_len
        yield _pair(stream.read(starts, length + 1))  # (rows, length), (rows, length)


class Shuffled:
    """Infinite, resumable iterator of batches over a list of items: `batch_size` items at a time in
    a fresh seeded order each epoch, each batch made by `collate(list of items)`. With `length`
    (item -> int), batches are bucketed: each window of 50 batches is sorted by length before it is
    cut, and the batches are shuffled, so a batch holds items of similar length (less padding)."""

    def __init__(self, items: list, batch_size: int, seed: int = 0, collate=list, length=None):
        if not items:
            raise ValueError("no training items (all were filtered out, or the data is empty)")
        self.items, self.batch_size, self.seed, self.collate = items, batch_size, seed, collate
        self.lengths = None if length is None else np.array([length(x) for x in items])
        self.epoch, self.pos = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        if self._cache is None or self._cache[0] != self.epoch:
            rng = np.random.default_rng(self.seed + self.epoch)
            order = rng.permutation(len(self.items))
            if self.lengths is not None:
                window = 50 * self.batch_size
                order = np.concatenate(
                    [
                        w[np.argsort(self.lengths[w], kind="stable")]
                        for w in np.split(order, range(window, len(order), window))
                    ]
                )
                batches = np.split(order, range(self.batch_size, len(order), self.batch_size))
                order = np.concatenate([batches[i] for i in rng.permutation(len(batches))])
            self._cache = (self.epoch, order)
        return self._cache[1]

    def __iter__(self):
        return self

    def __next__(self):
        picked = []
        while len(picked) < self.batch_size:
            order = self._order()
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            picked.append(self.items[order[self.pos]])
            self.pos += 1
        return self.collate(picked)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
