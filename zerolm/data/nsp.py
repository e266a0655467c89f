"""Sentence pairs for next-sentence prediction: documents split into sentences, tokenised into a
flat corpus, and paired as BERT does (A, then the real B or a random span of another document)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from zerolm.tokenizer import Tokenizer

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
