"""BERT pretraining data: masked-token corruption, sentence pairs for next-sentence prediction, and
a resumable batch iterator.

A training example is `[CLS] A [SEP] B [SEP]` with segment ids 0 (CLS, A, first SEP) and 1 (B,
last SEP): A is one or more whole sentences of a document; B is the sentences that really follow
(NSP label 0) or, half of the time, a span from a random other document (label 1; BERT's and HF's
convention, zerolm.model.bert.Bert.nsp_logits), as in
Devlin et al. 2019 (`create_pretraining_data.py`). Masking (15 % of the real, non-special
tokens; of those 80 % -> [MASK], 10 % -> a random token, 10 % kept) is drawn per batch from a
generator seeded by (seed, batch number), so a resumed run sees exactly the same batches.

Sentences and their pairs are built in nsp.py, the batch iterators are in mlm_batches.py.

Legend: B sequences, T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from zerolm.data.collate import IGNORE, length_mask, pad_right
from zerolm.data.nsp import SentencePair
from zerolm.tokenizer import CLS, MASK, PAD, SEP, SPECIAL_TOKENS

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


# ---------------------------------------------------------------- [CLS] A [SEP] B [SEP] rows
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
