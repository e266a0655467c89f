"""Preallocated key/value cache of `slots` sequences, each with its own length.

Buffers are (n_layers, slots, K, max_len, Dh) for keys and for values; `lengths[s]` positions of
slot s are filled. A forward call writes T new tokens for some slots (`rows`, default all): with
T == 1 every row writes at its own length (a decode step of sequences of different lengths, the
case of continuous batching); with T > 1 the rows must all be at the same length (a prefill or a
chunk of one). Attention then spans the first max(lengths) + T slots, with each row's unwritten
slots masked out. A freed slot is reused after `reset(slot)`; nothing needs clearing. Rows given
as a slice are read as views; rows given as a tensor of slot ids are gathered (a copy per layer),
so a caller decoding many steps keeps its live sequences in slots 0..n-1 (`move`).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (n_layers, slots, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,)
        self.slots, self.max_len = slots, max_len
        self._call = None

    @classmethod
    def for_model(cls, model, slots: int, max_len: int | None = None, dtype=None) -> KVCache:
        cfg = model.cfg
        if max_len is not None and max_len > cfg.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's max_seq_len={cfg.max_seq_len}")
        param = next(model.parameters())
        return cls(cfg.n_layers, slots, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.d_model // cfg.n_heads,
                   dtype or param.dtype, param.device)

    def begin(self, rows: torch.Tensor | slice | None, T: int, window: int = 0):
        """Plan a call writing T tokens for slots `rows` ((B,) long slot ids, a slice, None = all).
        Returns (positions (B, T) of the new tokens, attention mask (B|1, 1, T, S) or None)."""
        rows = slice(None) if rows is None else rows
        start = self.lengths[rows]  # (B,)
        first, last = int(start.min()), int(start.max())
        if T > 1 and first != last:
            raise ValueError(f"a {T}-token call needs its rows at one length; they are at {start.tolist()}: "
                             "prefill sequences one at a time (or those of equal length together)")
        span = last + T  # S: keys attended
        if span > self.max_len:
            raise ValueError(f"KV cache full: {span} positions needed, {self.max_len} allocated")
        new = torch.arange(T, device=start.device)
        positions = start[:, None] + new  # (B, T)
        self._call = (rows, start, first, T, span, torch.arange(start.shape[0], device=start.device))
        k = torch.arange(span, device=start.device)  # key slots
        if T == 1:  # row b sees its own keys 0..start[b]
            if first == last and not window:
                return positions, None
            allowed = k[None, :] <= start[:, None]  # (B, S)
            if window:
                allowed = allowed & (start[:, None] - k[None, :] < window)
            return positions, allowed[:, None, None, :]
        if first == 0 and not window:
            return positions, None  # plain causal
        q = first + new  # (T,) query slots
        allowed = k[None, :] <= q[:, None]  # (T, S)
        if window:
            allowed = allowed & (q[:, None] - k[None, :] < window)
        return positions, allowed[None, None]

    def update(self, layer: int, k, v):
        """Write (B, K, T, Dh) new keys/values as planned by begin; return the (B, K, S, Dh) keys/values to attend."""
        rows, start, first, T, span, batch = self._call
        kc, vc = self.k[layer], self.v[layer]  # (slots, K, max_len, Dh)
        if isinstance(rows, slice):
            kc, vc, rows = kc[rows], vc[rows], slice(None)  # views of the rows
        if T == 1:
            idx = batch if isinstance(rows, slice) else rows
            kc[idx, :, start] = k[:, :, 0]
            vc[idx, :, start] = v[:, :, 0]
        else:
            kc[rows, :, first : first + T] = k
            vc[rows, :, first : first + T] = v
        return kc[rows, :, :span], vc[rows, :, :span]

    def end(self) -> None:
        rows, _, _, T, _, _ = self._call
        self.lengths[rows] += T
        self._call = None

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's sequence into slot dst (e.g. to keep live sequences in slots 0..n-1)."""
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def reset(self, slot: int | None = None) -> None:
        """Forget slot `slot` (all slots if None) so a new sequence can use it."""
        if slot is None:
            self.lengths.zero_()
        else:
            self.lengths[slot] = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
