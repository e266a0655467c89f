"""BERT pretraining data: masked-token corruption, sentence pairs for next-sentence prediction, and
a resumable batch iterator.

A training example is `[CLS] A [SEP] B [SEP]` with segment ids 0 (CLS, A, first SEP) and 1 (B,
last SEP): A is one or more whole sentences of a document; B is the sentences that really follow
(NSP label 0) or, half of the time, a span from a random other document (label 1; BERT's and HF's
convention, zerolm.model.bert.Bert.nsp_logits), as in
Devlin et al. 2019 (`create_pretraining_data.py`). Masking (15 % of the real, non-special
tokens; of those 80 % -> [MASK], 10 % -> a random token, 10 % kept) is drawn per batch from a
generator seeded by (seed, batch number), so a resumed run sees exactly the same batches.

Legend: B sequences, T tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zerolm.data.collate import IGNORE, length_mask, pad_right
from zerolm.tokenizer import CLS, MASK, PAD, SEP, SPECIAL_TOKENS, Tokenizer

N_SPECIAL = len(SPECIAL_TOKENS)  # ids below this are special tokens in every zerolm tokenizer
PAD_ID, CLS_ID, SEP_ID, MASK_ID = (SPECIAL_TOKENS.index(t) for t in (PAD, CLS, SEP, MASK))


# ---------------------------------------------------------------- masking
def mask_tokens(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    vocab_size: int,
    mask_id: int = MASK_ID,
    generator: torch.Generator,
    prob: float = 0.15,
    first_normal: int = N_SPECIAL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption. ids (B, T), maskable (B, T) bool (real, non-special tokens) ->
    (inputs (B, T), labels (B, T)): each maskable position is selected with probability `prob`;
    a selected one becomes `mask_id` (80 %), a uniformly random non-special token (ids
    first_normal..vocab_size-1; 10 %) or stays (10 %), and its label is the original id.
    Unselected positions have label -100."""
    u = torch.rand(ids.shape, generator=generator)
    how = torch.rand(ids.shape, generator=generator)
    rand_ids = torch.randint(first_normal, vocab_size, ids.shape, generator=generator)
    selected = maskable & (u < prob)
    labels = torch.where(selected, ids, IGNORE)
    inputs = torch.where(selected & (how < 0.8), mask_id, ids)
    inputs = torch.where(selected & (how >= 0.8) & (how < 0.9), rand_ids, inputs)
    return inputs, labels


# ---------------------------------------------------------------- sentences
_ENDS = "。！？；"  # Chinese sentence ends: always a boundary
_CLOSE = "”’」』）》\"')"
_SPLIT = re.compile(
    # after 。！？； unless a closing quote or more punctuation follows
    rf"(?<=[{_ENDS}])(?![{_CLOSE}{_ENDS}])"
    rf"|(?<=[{_ENDS}][{_CLOSE}])"  # after the closing quote of such a sentence
    # English: a sentence end (and its quote) before a space
    r"|(?<=[.!?])(?=\s)|(?<=[.!?][\"')’”])(?=\s)"
    r"|\n"  # line breaks (a verse line, a paragraph)
)


def split_sentences(text: str) -> list[str]:
    """Sentences of a document: Chinese after 。！？； (with their closing quotes), English after
    . ! ? before a space, and at every line break; stripped, empty ones dropped."""
    return [s for s in (p.strip() for p in _SPLIT.split(text)) if s]


@dataclass
class SentenceCorpus:
    """Tokenised documents as flat arrays: sentence s of the corpus is
    tokens[sent_starts[s]:sent_starts[s + 1]], document d holds sentences
    doc_starts[d]..doc_starts[d + 1] - 1."""

    tokens: np.ndarray  # (N,) int32
    sent_starts: np.ndarray  # (S + 1,) int64
    doc_starts: np.ndarray  # (D + 1,) int64

    @classmethod
    def from_texts(cls, texts: Iterable[str], tok: Tokenizer, chunk: int = 4096) -> SentenceCorpus:
        sent_lens: list[int] = []
        doc_lens: list[int] = []
        pieces: list[np.ndarray] = []
        batch: list[str] = []

        def flush():
            for ids in tok.encode_batch(
                batch, split_special=False
            ):  # text never spells a special token
                sent_lens.append(len(ids))
                pieces.append(np.asarray(ids, dtype=np.int32))
            batch.clear()

        for text in texts:
            sents = split_sentences(text)
            doc_lens.append(len(sents))
            batch += sents
            if len(batch) >= chunk:
                flush()
        flush()
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        return cls(
            tokens,
            np.concatenate([[0], np.cumsum(sent_lens, dtype=np.int64)]),
            np.concatenate([[0], np.cumsum(doc_lens, dtype=np.int64)]),
        )

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts) - 1

    def doc(self, d: int) -> list[np.ndarray]:
        """Document d's sentences (empty ones, e.g. all-whitespace after normalisation, dropped)."""
        s0, s1 = self.doc_starts[d], self.doc_starts[d + 1]
        out = [self.tokens[self.sent_starts[s] : self.sent_starts[s + 1]] for s in range(s0, s1)]
        return [s for s in out if len(s)]


# ---------------------------------------------------------------- sentence pairs
SentencePair = tuple[np.ndarray, np.ndarray, int]  # (A ids, B ids, nsp label: 1 = B is random)


def truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Longest first: while the pair is too long, drop a token from the longer side, A from its
    start and B from its end, so the A|B boundary (what NSP reads) stays intact."""
    la, lb = len(a), len(b)
    while la + lb > max_tokens:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return a[len(a) - la :], b[:lb]


def make_pairs(
    corpus: SentenceCorpus,
    max_seq_len: int,
    rng: np.random.Generator,
    *,
    nsp: bool = True,
    short_seq_prob: float = 0.1,
) -> list[SentencePair]:
    """(A, B, nsp_label) for every chunk of every document (BERT's recipe): sentences are
    gathered into a chunk until it reaches the target length (max_seq_len - 3, or with
    probability short_seq_prob a random shorter one); A is the chunk's first 1..k-1 sentences; B
    is the rest (label 0) or, with probability 1/2, sentences from a random start in a random
    other document up to the remaining length (label 1; the chunk's unused sentences start the
    next chunk). Chunks of one sentence have no real next span and are skipped, so the label is
    a fair coin. nsp=False: B is always the real continuation."""
    max_tokens = max_seq_len - 3  # [CLS] A [SEP] B [SEP]
    if max_tokens < 2:
        raise ValueError(
            f"max_seq_len={max_seq_len} leaves no room for a sentence pair (needs >= 5)"
        )
    if nsp and corpus.n_docs < 2:
        raise ValueError(
            "next-sentence prediction needs at least 2 documents (B from another document)"
        )
    out = []
    for d in range(corpus.n_docs):
        doc = corpus.doc(d)
        target = (
            max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
        )
        chunk, length, i = [], 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                if len(chunk) >= 2:
                    a_end = int(rng.integers(1, len(chunk)))
                    a = np.concatenate(chunk[:a_end])
                    if nsp and rng.random() < 0.5:
                        b = _random_span(corpus, d, max(1, target - len(a)), rng)
                        i -= len(chunk) - a_end  # the sentences not used go back for the next chunk
                        label = 1
                    else:
                        b, label = np.concatenate(chunk[a_end:]), 0
                    out.append((*truncate_pair(a, b, max_tokens), label))
                chunk, length = [], 0
            i += 1
    return out


def _random_span(
    corpus: SentenceCorpus, d: int, length: int, rng: np.random.Generator
) -> np.ndarray:
    """Sentences from a random start in a random document other than d, up to `length` tokens."""
    for _ in range(10):
        other = int(rng.integers(0, corpus.n_docs - 1))
        other += other >= d
        sents = corpus.doc(other)
        if sents:
            break
    else:
        raise ValueError("next-sentence prediction found no other non-empty document to draw from")
    start, span, n = int(rng.integers(0, len(sents))), [], 0
    for s in sents[start:]:
        span.append(s)
        n += len(s)
        if n >= length:
            break
    return np.concatenate(span)


def pair_ids(
    a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray
) -> tuple[list[int], list[int]]:
    """`[CLS] a [SEP] b [SEP]` (or `[CLS] a [SEP]` when b is empty) and its segment ids."""
    ids = [CLS_ID, *a, SEP_ID]
    segments = [0] * len(ids)
    if len(b):
        ids += [*b, SEP_ID]
        segments += [1] * (len(b) + 1)
    return ids, segments


def pad_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    multiple: int = 8,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(ids, segments)] -> (ids, segments, attention_mask), each (B, T) long, right-padded to the
    longest row rounded up to `multiple` (fewer distinct shapes), at most max_len."""
    T = max(len(r[0]) for r in rows)
    T = -(-T // multiple) * multiple
    if max_len:
        T = min(T, max_len)
    ids, seg = [r[0] for r in rows], [r[1] for r in rows]
    return pad_right(ids, PAD_ID, T), pad_right(seg, 0, T), length_mask(ids, T).long()


def collate_pairs(
    pairs: Sequence[SentencePair],
    *,
    vocab_size: int,
    generator: torch.Generator,
    prob: float = 0.15,
    max_len: int | None = None,
) -> tuple:
    """Pairs -> (ids, segments, attention_mask, labels) each (B, T), nsp_labels (B,): padded and
    masked."""
    ids, seg, att = pad_rows([pair_ids(a, b) for a, b, _ in pairs], max_len=max_len)
    maskable = (att == 1) & (ids >= N_SPECIAL)  # never [CLS], [SEP], padding or <|unk|>
    inputs, labels = mask_tokens(
        ids, maskable, vocab_size=vocab_size, generator=generator, prob=prob
    )
    return inputs, seg, att, labels, torch.tensor([p[2] for p in pairs], dtype=torch.long)


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
        vocab_size: int,
        seed: int = 0,
        mask_prob: float = 0.15,
        nsp: bool = True,
        short_seq_prob: float = 0.1,
        bucket: int = 64,
    ):
        self.corpus, self.batch_size, self.max_seq_len = corpus, batch_size, max_seq_len
        self.vocab_size, self.seed, self.mask_prob = vocab_size, seed, mask_prob
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
            vocab_size=self.vocab_size,
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
    vocab_size: int,
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
        collate_pairs(
            pairs[i : i + batch_size], vocab_size=vocab_size, generator=gen, prob=mask_prob
        )
        for i in range(0, n, batch_size)
    ]
