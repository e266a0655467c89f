"""Weight quantization math: pure functions from a float matrix (N, K) to integer codes and
per-group scales, and back.

Legend: N output rows, K inputs, G = K / group scale groups per row, g weights per group.

The codes follow llama.cpp's blocks, so a zerolm model with group 32 writes to GGUF as a copy and
reads back from it bit for bit (checked against the `gguf` package's own quantisation):
  int8 sym   w = d * q,        q in [-127, 127], d = absmax / 127             (Q8_0 at g = 32)
  int4 sym   w = d * (q - 8),  q in [0, 15],     d = (signed absmax) / -8     (Q4_0 at g = 32)
  int4 asym  w = d * q + m,    q in [0, 15],     d = (max - min) / 15, m = min (Q4_1 at g = 32)
Scales d and mins m are stored as float16, as GGUF does; codes are computed with the float32 d,
as ggml does. Two int4 codes share a byte in GGUF's order: within each run of 32 weights, byte j
holds weight j in its low nibble and weight j + 16 in its high one.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Scheme = Literal["sym", "asym"]
BLOCK = 32  # the kernels' and GGUF's unit: every group is a whole number of 32-weight runs


class Quantized(NamedTuple):
    """Codes and scales of one matrix. qweight: int8 (N, K) for 8 bits; uint8 (N, K/2) for 4 bits,
    two codes per byte. scales: float16 (N, G). mins: float16 (N, G) for int4 asym, else None."""

    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None


def check_group(k: int, group: int, what: str = "weight") -> int:
    """The group size for rows of k inputs (group 0: one group per row), or a ValueError."""
    g = group or k
    if g % BLOCK or k % g:
        raise ValueError(
            f"{what} has {k} inputs, which groups of {g} do not divide into whole {BLOCK}-weight "
            f"runs; use a group size that is a multiple of {BLOCK} and divides {k} "
            "(32 divides every zerolm and HF model width here), or 0 for one scale per row"
        )
    return g


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (C's roundf, which ggml uses; torch.round rounds half to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def quantize(w: torch.Tensor, bits: int, group: int = BLOCK, scheme: Scheme = "sym") -> Quantized:
    """Round-to-nearest quantization of w (N, K), any float dtype, computed in float32."""
    n, k = w.shape
    g = check_group(k, group)
    x = w.detach().float().reshape(n, k // g, g)  # (N, G, g)
    mins = None
    if bits == 8:
        if scheme != "sym":
            raise ValueError("int8 is symmetric only (as Q8_0); use --scheme sym")
        d = x.abs().amax(-1, keepdim=True) / 127
        q = _roundf(x * _inverse(d)).to(torch.int8)
    elif bits == 4 and scheme == "sym":
        big = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # the signed value of largest size
        d = big / -8
        q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    elif bits == 4:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
        mins = lo.reshape(n, -1).half()
    else:
        raise ValueError(f"{bits}-bit weights are not supported; use 8 or 4")
    q = q.reshape(n, k)
    return Quantized(q if bits == 8 else pack_int4(q), d.reshape(n, -1).half(), mins)


def quantize_with(
    w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """The codes of w (N, K) under given float scales/mins (N, G), unpacked (int8 or uint8 (N, K)):
    the rounding step GPTQ repeats column by column with scales fixed up front."""
    n, k = w.shape
    x = w.float().reshape(n, scales.shape[1], -1)  # (N, G, g)
    inv = _inverse(scales.float())[..., None]
    if bits == 8:
        q = _roundf(x * inv).clamp(-127, 127).to(torch.int8)
    elif mins is None:
        q = torch.trunc(x * inv + 8.5).clamp(0, 15).to(torch.uint8)
    else:
        q = torch.trunc((x - mins.float()[..., None]) * inv + 0.5).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, K) in [0, 15] -> (N, K/2), GGUF's nibble order within each run of 32."""
    n, k = q.shape
    runs = q.reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) packed bytes -> uint8 codes (N, K)."""
    n, half = p.shape
    runs = p.reshape(n, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([runs & 15, runs >> 4], dim=2).reshape(n, half * 2)


def codes(qw: Quantized, bits: int) -> torch.Tensor:
    """The integer codes (N, K) of qw: int8 for 8 bits, uint8 in [0, 15] for 4."""
    return qw.qweight if bits == 8 else unpack_int4(qw.qweight)


def dequantize(qw: Quantized, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes and scales -> the float matrix (N, K) they stand for, in `dtype`."""
    q = codes(qw, bits).float()
    n, k = q.shape
    d = qw.scales.float()[..., None]  # (N, G, 1)
    q = q.reshape(n, d.shape[1], -1)
    if bits == 8:
        w = q * d
    elif qw.mins is None:
        w = (q - 8) * d
    else:
        w = q * d + qw.mins.float()[..., None]
    return w.reshape(n, k).to(dtype)


def quantized_bytes(n: int, k: int, bits: int, group: int, scheme: Scheme) -> int:
    """Bytes of one (N, K) matrix's codes, scales and mins, as stored."""
    g = group or k
    per_scale = 2 * (2 if scheme == "asym" else 1)
    return n * k * bits // 8 + n * (k // g) * per_scale
