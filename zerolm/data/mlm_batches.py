"""Resumable batch iterators for encoder training: rows batched by length, masked sentence-pair
batches (a fresh pairing each epoch), and fixed held-out batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from zerolm.data.mlm import BertIds, collate_pairs
from zerolm.data.nsp import SentenceCorpus, make_pairs


def length_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: int = 64
) -> list[np.ndarray]:
    """One epoch of batches (index arrays): a random order, sorted by length within windows of
    `bucket` batches (rows of a batch have similar lengths: little padding), cut into full
    batches (a last partial one is dropped), the batches in random order."""
    order, window = rng.permutation(len(lengths)), batch_size * max(1, bucket)
    order = np.concatenate(
        [np.zeros(0, np.int64)]
        + [
            c[np.argsort(lengths[c], kind="stable")]
            for c in np.split(order, range(window, len(order), window))
        ]
    )
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class LengthBatches:
    """Infinite, resumable iterator of `collate([items])` batches over `items` in length_batches
    order, a fresh one each epoch from a generator seeded by (seed, epoch)."""

    def __init__(
        self,
        items: list,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        collate=list,
        bucket: int = 64,
    ):
        if len(items) < batch_size:
            raise ValueError(
                f"{len(items)} training rows, fewer than one batch of {batch_size}: lower "
                "train.batch_size"
            )
        self.items, self.lengths, self.batch_size = items, np.asarray(lengths), batch_size
        self.seed, self.collate, self.bucket = seed, collate, bucket
        self.epoch, self.pos = 0, 0
        self._cached: tuple[int, list[np.ndarray]] = (-1, [])  # (epoch, its batches)

    def _batches(self) -> list[np.ndarray]:
        if self._cached[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._cached = (
                self.epoch,
                length_batches(self.lengths, self.batch_size, rng, self.bucket),
            )
        return self._cached[1]

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos == len(self._batches()):
            self.epoch, self.pos = self.epoch + 1, 0
        batch = self._batches()[self.pos]
        self.pos += 1
        return self.collate([self.items[i] for i in batch])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


def _seeded(seed: int, n: int) -> torch.Generator:
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, n]).generate_state(1)[0])
    )


class PairBatches:
    """Infinite, resumable iterator of masked sentence-pair batches (ids, segments,
    attention_mask, labels, nsp_labels). Each epoch pairs the documents afresh (new chunk
    lengths, splits and random B spans) from a generator seeded by (seed, epoch) and batches
    them by length (length_batches). Batch n is masked with a generator seeded by (seed, n).
    Deterministic given seed; state_dict / load_state_dict resume exactly."""

    def __init__(
        self,
        corpus: SentenceCorpus,
        *,
        batch_size: int,
        max_seq_len: int,
        bert_ids: BertIds,
        seed: int = 0,
        mask_prob: float = 0.15,
        nsp: bool = True,
        short_seq_prob: float = 0.1,
        bucket: int = 64,
    ):
        self.corpus, self.batch_size, self.max_seq_len = corpus, batch_size, max_seq_len
        self.bert_ids, self.seed, self.mask_prob = bert_ids, seed, mask_prob
        self.nsp, self.short_seq_prob, self.bucket = nsp, short_seq_prob, max(1, bucket)
        self.epoch, self.pos, self.served = 0, 0, 0
        self._cached: tuple[int, list, list] | None = None
        if not self._epoch()[1]:
            n = len(self._epoch()[0])
            raise ValueError(
                f"{n} sentence pair(s), fewer than one batch of {batch_size}: documents need at "
                "least two sentences (NSP pairs a sentence with the next); add documents or lower "
                "train.batch_size"
            )

    def _epoch(self) -> tuple[list, list[np.ndarray]]:
        if self._cached is None or self._cached[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            pairs = make_pairs(
                self.corpus, self.max_seq_len, rng, nsp=self.nsp, short_seq_prob=self.short_seq_prob
            )
            lengths = np.array([len(a) + len(b) for a, b, _ in pairs])
            self._cached = (
                self.epoch,
                pairs,
                length_batches(lengths, self.batch_size, rng, self.bucket),
            )
        return self._cached[1], self._cached[2]

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        pairs, batches = self._epoch()
        if self.pos == len(batches):
            self.epoch, self.pos = self.epoch + 1, 0
            pairs, batches = self._epoch()
        picked = [pairs[i] for i in batches[self.pos]]
        self.pos += 1
        batch = collate_pairs(
            picked,
            self.bert_ids,
            generator=_seeded(self.seed, self.served),
            prob=self.mask_prob,
        )
        self.served += 1
        return batch

    def epoch_size(self) -> tuple[int, int]:
        """(pairs, batches) of the current epoch."""
        pairs, batches = self._epoch()
        return len(pairs), len(batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.served = state["epoch"], state["pos"], state["served"]


def fixed_batches(
    corpus: SentenceCorpus,
    *,
    batch_size: int,
    max_seq_len: int,
    bert_ids: BertIds,
    seed: int = 0,
    mask_prob: float = 0.15,
    nsp: bool = True,
    limit: int = 0,
) -> list[tuple]:
    """One pass of held-out pairs, paired and masked once with a fixed seed: the same evaluation
    batches at every evaluation (at most `limit` batches; 0: all)."""
    pairs = make_pairs(
        corpus, max_seq_len, np.random.default_rng([seed, 1 << 20]), nsp=nsp, short_seq_prob=0.0
    )
    n = len(pairs) if not limit else min(len(pairs), limit * batch_size)
    gen = _seeded(seed, 1 << 30)
    return [
        collate_pairs(pairs[i : i + batch_size], bert_ids, generator=gen, prob=mask_prob)
        for i in range(0, n, batch_size)
    ]
