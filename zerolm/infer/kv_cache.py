"""Preallocated key/value cache of `slots` sequences, each with its own length.

Buffers are one (slots, K, max_len, Dh) tensor per layer for keys and for values; `lengths[s]` (a
Python int: lengths live on the host, so planning a call never waits on a tensor) positions of slot
s are filled. A forward call writes T new tokens for some slots (`rows`, default all): with T == 1
every row writes at its own length (a decode step of sequences of different lengths, the case of
continuous batching); with T > 1 the rows must all be at the same length (a prefill or a chunk of
one). Attention then spans the first max(lengths) + T slots, with each row's unwritten slots masked
out. A freed slot is reused after `reset(slot)`; nothing needs clearing. Rows given as a slice are
read as views; rows given as a tensor of slot ids are gathered (a copy per layer), so a caller
decoding many steps keeps its live sequences in slots 0..n-1 (`move`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zerolm.model.presets import head_size
from zerolm.model.protocol import LanguageModel


def decode_mask(positions: torch.Tensor, span: int, window: int = 0) -> torch.Tensor:
    """(B, 1, 1, S) allowed keys of one new token per row at `positions` (B, 1): keys 0..position,
    the last `window` of them with a sliding window."""
    k = torch.arange(span, device=positions.device)[None, :]  # (1, S) key slots
    allowed = k <= positions  # (B, S)
    if window:
        allowed = allowed & (positions - k < window)
    return allowed[:, None, None, :]


class _Plan(NamedTuple):
    """What begin() planned for the forward call under way; update() and end() carry it out."""

    rows: torch.Tensor | slice  # the slots written: (B,) ids or a slice
    slots: list[int]  # the same, as a list
    start: torch.Tensor | None  # (B,) each row's length when they differ; None: all at `first`
    first: int  # the shortest row's length
    T: int  # new tokens per row
    span: int  # S: keys attended


class KVCache:
    def __init__(
        self,
        n_layers: int,
        slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        # a tensor per layer, written in place: the inputs a compiled step (infer/compiled.py) takes
        shape = (slots, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * slots
        self.slots, self.max_len = slots, max_len
        self._call: _Plan | None = None

    @classmethod
    def for_model(
        cls,
        model: LanguageModel,
        slots: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        cfg = model.cfg
        if max_len is not None and max_len > cfg.max_seq_len:
            raise ValueError(
                f"a cache of {max_len} positions exceeds the model's max_seq_len={cfg.max_seq_len}"
            )
        param = next(model.parameters())
        return cls(
            cfg.n_layers,
            slots,
            cfg.n_kv_heads,
            max_len or cfg.max_seq_len,
            head_size(cfg),
            dtype or param.dtype,
            param.device,
        )

    def _slots(self, rows: torch.Tensor | slice) -> list[int]:
        return list(range(self.slots)[rows]) if isinstance(rows, slice) else rows.tolist()

    def begin(
        self, rows: torch.Tensor | slice | None, T: int, window: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plan a call writing T tokens for slots `rows` ((B,) long slot ids, a slice, None = all).
        Returns (positions (B, T) of the new tokens, attention mask (B|1, 1, T, S) or None)."""
        rows = slice(None) if rows is None else rows
        slots = self._slots(rows)
        lens = [self.lengths[s] for s in slots]
        first, last = min(lens), max(lens)
        if T > 1 and first != last:
            raise ValueError(
                f"a {T}-token call needs its rows at one length; they are at {lens}: "
                "prefill sequences one at a time (or those of equal length together)"
            )
        span = last + T  # S: keys attended
        if span > self.max_len:
            raise ValueError(f"KV cache full: {span} positions needed, {self.max_len} allocated")
        dev = self.k[0].device
        start = None if first == last else torch.tensor(lens, device=dev)  # (B,) when rows differ
        self._call = _Plan(rows, slots, start, first, T, span)
        new = torch.arange(T, device=dev)
        positions = (
            (first + new).expand(len(slots), T) if start is None else start[:, None] + new
        )  # (B, T)
        if T == 1:  # row b sees its own keys 0..start[b]
            plain = start is None and not window
            return positions, None if plain else decode_mask(positions, span, window)
        if first == 0 and not window:
            return positions, None  # plain causal
        k = torch.arange(span, device=dev)  # key slots
        q = first + new  # (T,) query slots
        allowed = k[None, :] <= q[:, None]  # (T, S)
        if window:
            allowed = allowed & (q[:, None] - k[None, :] < window)
        return positions, allowed[None, None]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, K, T, Dh) new keys/values as planned by begin; return the (B, K, S, Dh)
        keys/values to attend."""
        assert self._call is not None, "update() outside a begin() ... end() call"
        rows, _, start, first, T, span = self._call
        kc, vc = self.k[layer], self.v[layer]  # (slots, K, max_len, Dh)
        if isinstance(rows, slice) and rows != slice(None):
            kc, vc, rows = kc[rows], vc[rows], slice(None)  # views of the rows
        if start is None:
            kc[rows, :, first : first + T] = k
            vc[rows, :, first : first + T] = v
        else:  # T == 1, each row at its own length
            idx = torch.arange(len(start), device=start.device) if isinstance(rows, slice) else rows
            kc[idx, :, start] = k[:, :, 0]
            vc[idx, :, start] = v[:, :, 0]
        return kc[rows, :, :span], vc[rows, :, :span]

    def end(self) -> None:
        assert self._call is not None, "end() without begin()"
        _, slots, _, _, T, _ = self._call
        for s in slots:
            self.lengths[s] += T
        self._call = None

    def select(self, idx: torch.Tensor) -> None:
        """Keep slots idx (N',) in that order, dropping the others (k/v rows are gathered)."""
        self.k, self.v = [k[idx] for k in self.k], [v[idx] for v in self.v]
        self.lengths = [self.lengths[i] for i in idx.tolist()]
        self.slots = len(self.lengths)

    def reorder(self, idx: torch.Tensor, n: int) -> None:
        """Slot r continues slot idx[r] (beam search): the first n positions are gathered in
        place."""
        for k, v in zip(self.k, self.v):
            k[:, :, :n], v[:, :, :n] = k[idx, :, :n], v[idx, :, :n]
        self.lengths = [self.lengths[i] for i in idx.tolist()]

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's sequence into slot dst (e.g. to keep live sequences in slots 0..n-1)."""
        n = self.lengths[src]
        for k, v in zip(self.k, self.v):
            k[dst, :, :n], v[dst, :, :n] = k[src, :, :n], v[src, :, :n]
        self.lengths[dst] = n

    def reset(self, slot: int | None = None) -> None:
        """Forget slot `slot` (all slots if None) so a new sequence can use it."""
        if slot is None:
            self.lengths = [0] * self.slots
        else:
            self.lengths[slot] = 0

    def scrub(self, slot: int) -> None:
        """Zero what slot `slot` holds: a sequence that wrote NaN there would otherwise leave it to
        the slot's next owner, whose masked positions give 0 * NaN = NaN in attention."""
        n = self.lengths[slot]
        for k, v in zip(self.k, self.v):
            k[slot, :, :n] = 0
            v[slot, :, :n] = 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)
