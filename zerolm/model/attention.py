"""Multi-head / grouped-query attention on scaled_dot_product_attention: causal self-attention, and
cross-attention to an encoder memory (keys/values given, projected once per source by `project_kv`).

Legend: B batch, T new tokens, S cached + new positions (or memory positions), H query heads,
K kv heads, Dh head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zerolm.model.layers import RMSNorm, apply_rope, split_keys


def attention_mask(T: int, device=None, window: int = 0, segments=None):
    """Boolean (B|1, 1, T, T) mask of allowed keys for a call without cache: causal, optionally a
    sliding window and packed-sequence segments (B, T): a token sees only its own segment (its
    own conversation in a packed row). None when plain causal will do."""
    if not window and segments is None:
        return None
    q = torch.arange(T, device=device)[:, None]  # (T, 1)
    k = q.T  # (1, T)
    allowed = k <= q
    if window:
        allowed = allowed & (q - k < window)
    allowed = allowed[None, None]  # (1, 1, T, T)
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    return allowed


# Longest key length for which bf16 attention runs as explicit matmuls + float32 softmax: on the
# 2-core AVX-512 CPU that path trains 2-3x faster than the fused CPU kernel at S <= 512 (forward +
# backward, B*T = 2048, Dh 64), slower from S = 1024 on, where the (T, S) score matrix grows.
EXPLICIT_MAX_S = 512


def attend(q, k, v, mask=None, dropout_p: float = 0.0):
    """softmax(q k^T / sqrt(Dh) + mask) v for (B, H, T, Dh) queries and (B, H, S, Dh) keys/values;
    `mask` is a boolean (B|1, 1, T, S) of allowed keys, None for plain causal (T == S) or T == 1.
    Explicit matmuls on CPU for bf16 at S <= EXPLICIT_MAX_S, and for a compiled decode step
    (T == 1), which Inductor then fuses into its own kernels: 8 % more tokens/s at 58 M than a
    call of the fused attention kernel per layer."""
    T, S = q.shape[2], k.shape[2]
    explicit = (q.dtype == torch.bfloat16 and S <= EXPLICIT_MAX_S) or (
        T == 1 and torch.compiler.is_compiling()
    )
    if q.device.type != "cpu" or not explicit:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, dropout_p=dropout_p
        )
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return p @ v  # (B, H, T, Dh)


class Attention(nn.Module):
    """Self- or cross-attention with q, k, v as three linears: the layout training and LoRA use.
    FusedQKVAttention (transforms.layout.decode_layout) is the same math stored as one matrix.

    head_dim: Dh (0: d / n_heads); bias: on `o` (and on q, k, v unless qkv_bias says otherwise,
    as Qwen2's); qk_norm_eps: an RMSNorm with this eps over each head of q and of k, before RoPE
    (Qwen3's q_norm / k_norm), None for none."""

    def __init__(
        self,
        d: int,
        n_heads: int,
        n_kv_heads: int,
        bias: bool,
        dropout: float,
        *,
        head_dim: int = 0,
        qkv_bias: bool | None = None,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.h, self.kv, self.dh = n_heads, n_kv_heads, head_dim or d // n_heads
        # registered before `o`: init_weights draws in this order
        self.init_projections(d, bias if qkv_bias is None else qkv_bias)
        self.o = nn.Linear(n_heads * self.dh, d, bias=bias)
        self.q_norm = None if qk_norm_eps is None else RMSNorm(self.dh, qk_norm_eps)
        self.k_norm = None if qk_norm_eps is None else RMSNorm(self.dh, qk_norm_eps)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def init_projections(self, d: int, bias: bool) -> None:
        self.q = nn.Linear(d, self.h * self.dh, bias=bias)
        self.k = nn.Linear(d, self.kv * self.dh, bias=bias)
        self.v = nn.Linear(d, self.kv * self.dh, bias=bias)

    def project_q(self, x):
        """Queries (B, H, T, Dh) of x (B, T, D), not rotated."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.dh).transpose(1, 2)
        return q if self.q_norm is None else self.q_norm(q)

    def project_kv_heads(self, x):
        """Keys and values (B, K, T, Dh) of x (B, T, D), not rotated."""
        B, T, _ = x.shape
        k = self.k(x).view(B, T, self.kv, self.dh).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv, self.dh).transpose(1, 2)
        return k if self.k_norm is None else self.k_norm(k), v

    def project(self, x, rope=None):
        """Self-attention q (B, H, T, Dh), k, v (B, K, T, Dh) of x (B, T, D), q and k rotated."""
        q, (k, v) = self.project_q(x), self.project_kv_heads(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def project_kv(self, memory):
        """Cross-attention keys and values (B, H, S, Dh) of an encoder memory (B, S, D): computed
        once per source and passed to every call as `kv` (already repeated to H heads,
        contiguous)."""
        k, v = self.project_kv_heads(memory)  # (B, K, S, Dh)
        if self.kv != self.h:
            k, v = (
                k.repeat_interleave(self.h // self.kv, dim=1),
                v.repeat_interleave(self.h // self.kv, dim=1),
            )
        return k.contiguous(), v.contiguous()

    def forward(self, x, *, rope=None, mask=None, cache=None, layer: int = 0, kv=None):
        """x (B, T, D) -> (B, T, D). kv: cross-attention keys/values from project_kv (then `mask` is
        the (B|1, 1, 1|T, S) allowed memory positions; None only when T == 1)."""
        B, T, _ = x.shape
        if kv is not None:
            q, (k, v) = self.project_q(x), kv  # (B, H, T, Dh), (B, H, S, Dh)
        else:
            q, k, v = self.project(x, rope)  # (B, H, T, Dh), (B, K, T, Dh)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, Dh)
        if self.kv != self.h and kv is None:
            k = k.repeat_interleave(self.h // self.kv, dim=1)  # (B, H, S, Dh)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.h * self.dh)
        return self.resid_drop(self.o(y))


class FusedQKVAttention(Attention):
    """Attention with q, k, v stored once, as the rows of one linear `wqkv` ((H+2K)·Dh, D), as in
    gpt-fast: a decode step makes one matrix-vector product where Attention makes three (+10 %
    batch-1 tokens/s at 10 M), and rotates queries and keys in one go. Its state_dict holds the
    split q/k/v keys and loading accepts them, so checkpoints never see this layout. Exact under
    autograd as well (gradients reach wqkv), but only decode_layout builds it: training keeps the
    split layout, so its kernels and resumed losses do not change."""

    def init_projections(self, d: int, bias: bool) -> None:
        self.wqkv = nn.Linear(d, (self.h + 2 * self.kv) * self.dh, bias=bias)
        split_keys(
            self, "wqkv", {"q": self.h * self.dh, "k": self.kv * self.dh, "v": self.kv * self.dh}
        )

    def _rows(self, start: int, end: int | None = None):
        """(weight, bias) of rows start:end of wqkv: the q rows, or the k and v rows."""
        w, b = self.wqkv.weight, self.wqkv.bias
        return w[start:end], None if b is None else b[start:end]

    def project_q(self, x):
        B, T, _ = x.shape
        q = F.linear(x, *self._rows(0, self.h * self.dh))
        q = q.view(B, T, self.h, self.dh).transpose(1, 2)  # (B, H, T, Dh)
        return q if self.q_norm is None else self.q_norm(q)

    def project_kv_heads(self, x):
        B, T, _ = x.shape
        kv = F.linear(x, *self._rows(self.h * self.dh))
        kv = kv.view(B, T, 2 * self.kv, self.dh).transpose(1, 2)  # (B, 2K, T, Dh)
        k = kv[:, : self.kv]
        return k if self.k_norm is None else self.k_norm(k), kv[:, self.kv :]

    def project(self, x, rope=None):
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.h + 2 * self.kv, self.dh).transpose(1, 2)
        n = self.h + self.kv
        qk, v = qkv[:, :n], qkv[:, n:]  # (B, H+K, T, Dh), (B, K, T, Dh)
        if self.q_norm is not None and self.k_norm is not None:  # per head, before RoPE
            qk = torch.cat([self.q_norm(qk[:, : self.h]), self.k_norm(qk[:, self.h :])], dim=1)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotated in one go
        return qk[:, : self.h], qk[:, self.h :], v
