"""Shared building blocks: norms, feed-forward networks, positional encodings.

Legend: B batch, T sequence, D d_model, H heads, Dh head size, F d_ff.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the next matmul computes in: autocast's, if it is on for x's device, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 (as LLaMA does) and cast back."""

    def __init__(self, d: int, eps: float, feeds_matmul: bool = False):
        super().__init__()
        self.eps, self.feeds_matmul = eps, feeds_matmul
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):  # (B, T, D)
        if (
            x.dtype == torch.float32 and not torch.is_grad_enabled()
        ):  # inference: one fused op, same math
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(x.dtype)
        return y.to(matmul_dtype(x)) if self.feeds_matmul else y


class LayerNorm(nn.LayerNorm):
    def __init__(self, d: int, eps: float, bias: bool, feeds_matmul: bool = False):
        super().__init__(d, eps=eps, bias=bias)
        self.feeds_matmul = feeds_matmul

    def forward(self, x):  # (B, T, D); float32 under CPU autocast
        y = super().forward(x)
        return y.to(matmul_dtype(x)) if self.feeds_matmul else y


def make_norm(kind: str, d: int, eps: float, bias: bool, feeds_matmul: bool = False) -> nn.Module:
    """feeds_matmul: the output only feeds matmuls (pre-norm, final norm), so it is cast once to the
    matmul dtype (bf16 under autocast) rather than once per consuming matmul (q, k, v; gate, up);
    autocast would round it identically. Post-norm outputs are the residual stream: kept as is."""
    if kind == "rmsnorm":
        return RMSNorm(d, eps, feeds_matmul)
    return LayerNorm(d, eps, bias, feeds_matmul)


class FFN(nn.Module):
    """Two-matrix MLP (relu, gelu-tanh as in GPT-2, exact gelu as in BERT) or SwiGLU:
    down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, d_ff: int, kind: str, bias: bool, dropout: float):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d, d_ff, bias=bias)
        self.gate = nn.Linear(d, d_ff, bias=bias) if kind == "swiglu" else None
        self.down = nn.Linear(d_ff, d, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, D)
        fused = getattr(self, "fused_gate_up", None)  # set by infer.engine.decode_layout
        if fused is not None and not torch.is_grad_enabled():
            g, u = F.linear(x, fused[0], fused[1]).split(fused[2], dim=-1)
            h = F.silu(g) * u  # (B, T, F)
        elif self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, F)
        elif self.kind == "gelu":
            h = F.gelu(self.up(x), approximate="tanh")
        elif self.kind == "gelu_erf":
            h = F.gelu(self.up(x))
        else:
            h = F.relu(self.up(x))
        return self.drop(self.down(h))


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    """(n, d) table of Vaswani et al.: sin(pos / 10000^(2i/d)) in the first half of the dimensions,
    cos in the second. The paper interleaves them; concatenating (as tensor2tensor, fairseq and
    Marian do) is the same encoding up to a fixed permutation of dimensions, and lets Marian
    checkpoints load unchanged."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1)


def rope_tables(n: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n, Dh) in the half-split layout used by LLaMA checkpoints."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)  # (n, Dh/2)
    ang = torch.cat([ang, ang], dim=-1)  # (n, Dh)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """Rotate (B, H, T, Dh) queries/keys by position; cos/sin are (B or 1, 1, T, Dh)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def position_buffers(module: nn.Module, cfg) -> None:
    """Register a model's non-learned position tables (not saved: recomputed on load): RoPE's cos/sin
    (max_seq_len, Dh) or the sinusoidal table (max_seq_len, D)."""
    if cfg.position == "rope":
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        module.register_buffer("rope_cos", cos, persistent=False)
        module.register_buffer("rope_sin", sin, persistent=False)
    elif cfg.position == "sinusoidal":
        module.register_buffer(
            "pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False
        )
