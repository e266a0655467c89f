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
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from zerolm.data.collate import IGNORE, length_mask, pad_right
from zerolm.data.nsp import SentencePair
from zerolm.tokenizer import Tokenizer


@dataclass(frozen=True)
class BertIds:
    """The ids BERT inputs are made of, asked of the tokenizer by role (a BERT vocabulary puts its
    specials anywhere): [PAD] [CLS] [SEP] [MASK], every special id (never masked, never a random
    replacement) and the vocabulary size."""

    pad: int
    cls: int
    sep: int
    mask: int
    special: frozenset[int]
    vocab_size: int

    @classmethod
    def of(cls, tok: Tokenizer) -> BertIds:
        return cls(tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.special_ids, tok.vocab_size)

    @cached_property
    def normal(self) -> torch.Tensor:
        """(N,) long: the ids that are not special, ascending: what a random replacement draws."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[sorted(self.special)] = False
        return keep.nonzero().squeeze(1)

    @cached_property
    def special_tensor(self) -> torch.Tensor:
        return torch.tensor(sorted(self.special), dtype=torch.long)


# ---------------------------------------------------------------- masking
def mask_tokens(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    bert_ids: BertIds,
    *,
    generator: torch.Generator,
    prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption. ids (B, T), maskable (B, T) bool (real, non-special tokens) ->
    (inputs (B, T), labels (B, T)): each maskable position is selected with probability `prob`;
    a selected one becomes [MASK] (80 %), a uniformly random non-special token (bert_ids.normal;
    10 %) or stays (10 %), and its label is the original id. Unselected positions have label
    -100."""
    u = torch.rand(ids.shape, generator=generator)
    how = torch.rand(ids.shape, generator=generator)
    normal = bert_ids.normal
    rand_ids = normal[torch.randint(len(normal), ids.shape, generator=generator)]
    selected = maskable & (u < prob)
    labels = torch.where(selected, ids, IGNORE)
    inputs = torch.where(selected & (how < 0.8), bert_ids.mask, ids)
    inputs = torch.where(selected & (how >= 0.8) & (how < 0.9), rand_ids, inputs)
    return inputs, labels


# ---------------------------------------------------------------- [CLS] A [SEP] B [SEP] rows
def pair_ids(
    a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray, bert_ids: BertIds
) -> tuple[list[int], list[int]]:
    """`[CLS] a [SEP] b [SEP]` (or `[CLS] a [SEP]` when b is empty) and its segment ids."""
    ids = [bert_ids.cls, *a, bert_ids.sep]
    segments = [0] * len(ids)
    if len(b):
        ids += [*b, bert_ids.sep]
        segments += [1] * (len(b) + 1)
    return ids, segments


def pad_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    multiple: int = 8,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(ids, segments)] -> (ids, segments, attention_mask), each (B, T) long, right-padded (ids
    with pad_id) to the longest row rounded up to `multiple` (fewer distinct shapes), at most
    max_len."""
    T = max(len(r[0]) for r in rows)
    T = -(-T // multiple) * multiple
    if max_len:
        T = min(T, max_len)
    ids, seg = [r[0] for r in rows], [r[1] for r in rows]
    # segment ids are not token ids: padding takes segment 0 (masked out by attention_mask)
    return pad_right(ids, pad_id, T), pad_right(seg, 0, T), length_mask(ids, T).long()


def collate_pairs(
    pairs: Sequence[SentencePair],
    bert_ids: BertIds,
    *,
    generator: torch.Generator,
    prob: float = 0.15,
    max_len: int | None = None,
) -> tuple:
    """Pairs -> (ids, segments, attention_mask, labels) each (B, T), nsp_labels (B,): padded and
    masked."""
    rows = [pair_ids(a, b, bert_ids) for a, b, _ in pairs]
    ids, seg, att = pad_rows(rows, bert_ids.pad, max_len=max_len)
    # never [CLS], [SEP], padding, [UNK] or any other special token
    maskable = (att == 1) & ~torch.isin(ids, bert_ids.special_tensor)
    inputs, labels = mask_tokens(ids, maskable, bert_ids, generator=generator, prob=prob)
    return inputs, seg, att, labels, torch.tensor([p[2] for p in pairs], dtype=torch.long)
