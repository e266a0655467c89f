"""Batching token ids: right padding, and the label of positions no loss is taken on."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -100  # label of positions that are not predicted (F.cross_entropy's ignore_index)


def pad_right(seqs: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    """(B, T) long: each row's ids, then `value`; T is `length`, else the longest row. No default:
    token ids pad with the tokenizer's pad_id, labels with IGNORE."""
    T = max(map(len, seqs)) if length is None else length
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def length_mask(seqs: Sequence[Sequence[int]], length: int | None = None) -> torch.Tensor:
    """(B, T) bool, True on each row's real tokens (the positions `pad_right` does not fill)."""
    lengths = torch.tensor([len(s) for s in seqs])
    T = int(lengths.max()) if length is None else length
    return torch.arange(T)[None] < lengths[:, None]
