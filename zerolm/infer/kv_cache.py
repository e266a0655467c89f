"""Preallocated key/value cache: one (B, K, max_len, Dh) buffer per layer for keys and values.

All rows share one write position (`length`); rows of different prompt lengths are left-padded
and the padding slots masked out (see infer/engine.py).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        cfg = model.cfg
        param = next(model.parameters())
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.d_model // cfg.n_heads,
                   dtype or param.dtype, param.device)

    def update(self, layer: int, k, v):
        """Write (B, K, T, Dh) new keys/values at the current position; return (B, K, S, Dh) views."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
