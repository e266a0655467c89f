"""Shared building blocks: norms, feed-forward networks, positional encodings.

Legend: B batch, T sequence, D d_model, H heads, Dh head size, F d_ff.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zerolm.model.rope import rope_tables


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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(x.dtype)
        return y.to(matmul_dtype(x)) if self.feeds_matmul else y


class FusedRMSNorm(RMSNorm):
    """RMSNorm as one F.rms_norm call for float32 inputs (decode_layout): the same values as
    RMSNorm's float32 ops, bit for bit on this CPU, in one kernel instead of five. Training keeps
    RMSNorm, whose backward (and bf16 rounding) the trainer's losses were measured with."""

    def forward(self, x):  # (B, T, D)
        if x.dtype != torch.float32:
            return super().forward(x)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


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
        self.kind, self.d_ff = kind, d_ff
        self.init_inputs(d, d_ff, bias)  # registered before `down`: init_weights draws in order
        self.down = nn.Linear(d_ff, d, bias=bias)
        self.drop = nn.Dropout(dropout)

    def init_inputs(self, d: int, d_ff: int, bias: bool) -> None:
        self.up = nn.Linear(d, d_ff, bias=bias)
        self.gate = nn.Linear(d, d_ff, bias=bias) if self.kind == "swiglu" else None

    def inner(self, x):  # (B, T, D) -> (B, T, F)
        if self.kind == "swiglu":
            return F.silu(self.gate(x)) * self.up(x)
        if self.kind == "gelu":
            return F.gelu(self.up(x), approximate="tanh")
        if self.kind == "gelu_erf":
            return F.gelu(self.up(x))
        return F.relu(self.up(x))

    def forward(self, x):  # (B, T, D)
        return self.drop(self.down(self.inner(x)))


class FusedGateUpFFN(FFN):
    """SwiGLU FFN with gate and up stored once, as the rows of one linear `gate_up` (2F, D): one
    matrix-vector product per decode step instead of two (decode_layout). Its state_dict holds the
    split up/gate keys and loading accepts them; exact under autograd, used only for inference."""

    def init_inputs(self, d: int, d_ff: int, bias: bool) -> None:
        if self.kind != "swiglu":
            raise ValueError(f"FusedGateUpFFN needs ffn='swiglu' (got {self.kind!r}): use FFN")
        self.gate_up = nn.Linear(d, 2 * d_ff, bias=bias)
        split_keys(self, "gate_up", {"gate": d_ff, "up": d_ff}, order=("up", "gate"))

    def inner(self, x):  # (B, T, D) -> (B, T, F)
        g, u = self.gate_up(x).split(self.d_ff, dim=-1)
        return F.silu(g) * u


# the tensors of a linear that split_keys splits by rows: a float one's, a quantized one's (quant/)
FUSED_KINDS = ("weight", "bias", "qweight", "scales", "mins")


def split_keys(
    module: nn.Module, fused: str, parts: dict[str, int], order: tuple[str, ...] | None = None
) -> None:
    """State-dict hooks for a module whose linears `parts` (name -> out features, in row order)
    are stored as the rows of one linear `fused` (gpt-fast's load hook, both ways): state_dict
    gives the split keys (views), in the split module's order (`order` of parts, default as
    given), and load_state_dict accepts them, so checkpoints keep their keys and shapes."""
    names, sizes = list(parts), list(parts.values())
    rank = {n: i for i, n in enumerate(order or names)}

    def save(mod, state, prefix, _meta):
        own = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        for kind in FUSED_KINDS:
            t = own.pop(f"{fused}.{kind}", None)
            if t is not None:
                own.update({f"{n}.{kind}": s for n, s in zip(names, t.split(sizes))})
        # the parts first, where `fused` stood (registered before the other children); stable
        # sort: each part's weight before its bias
        first = sorted(
            (k for k in own if k.split(".")[0] in rank), key=lambda k: rank[k.split(".")[0]]
        )
        rest = [k for k in own if k.split(".")[0] not in rank]
        for k in first + rest:
            state[prefix + k] = own[k]

    def load(mod, state, prefix, *_):
        for kind in FUSED_KINDS:
            keys = [f"{prefix}{n}.{kind}" for n in names]
            if all(k in state for k in keys):
                state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(k) for k in keys])

    module.register_state_dict_post_hook(save)
    module.register_load_state_dict_pre_hook(load)


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    """(n, d) table of Vaswani et al.: sin(pos / 10000^(2i/d)) in the first half of the dimensions,
    cos in the second. The paper interleaves them; concatenating (as tensor2tensor, fairseq and
    Marian do) is the same encoding up to a fixed permutation of dimensions, and lets Marian
    checkpoints load unchanged."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1)


def apply_rope(x, cos, sin):
    """Rotate (B, H, T, Dh) queries/keys by position; cos/sin are (B or 1, 1, T, Dh)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def position_buffers(module: nn.Module, cfg) -> None:
    """Register a model's non-learned position tables (not saved: recomputed on load): RoPE's
    cos/sin (max_seq_len, Dh) or the sinusoidal table (max_seq_len, D)."""
    if cfg.position == "rope":
        cos, sin = rope_tables(cfg)
        module.register_buffer("rope_cos", cos, persistent=False)
        module.register_buffer("rope_sin", sin, persistent=False)
    elif cfg.position == "sinusoidal":
        module.register_buffer(
            "pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False
        )
