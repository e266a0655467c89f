"""The quantized matrix product y = x @ W.T + b, W given by its codes and scales (formats.py).

As llama.cpp does, the product quantizes x too: each 32-block of each row of x is rounded to int8
codes with scale absmax / 127 (half to even), Q(x), so the work is integer dot products. Paths:
  op     the C++ op torch.ops.zerolm.qlinear (csrc/qlinear.cpp, built by build.py): AVX-512 VNNI
  torch  pure torch: Q(x) @ dequantize(W).T, the same numbers up to float summation order
  float  dequantize(W) then F.linear on x itself (no Q(x)): differentiable, used whenever x needs
         a gradient (LoRA over a quantized base), and the exact reference for tests
"auto" (the default) takes the op where it is loaded and applies (CPU, no gradient), else torch.
A layer in the decode layout also holds its codes repacked (`pack`: 16 rows interleaved per
32-block, as llama.cpp's REPACK does for Q4_0), which the op's packed kernel streams.
`path(...)` forces one for a block of code; ZEROLM_KERNELS=0 in the environment turns the op off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from zerolm.quant.build import library_path
from zerolm.quant.formats import BLOCK, Quantized, check_group, dequantize

log = logging.getLogger(__name__)
KernelPath = Literal["auto", "op", "torch", "float"]
_forced: KernelPath = "auto"
_loaded: bool | None = None  # None: not tried yet


def load() -> bool:
    """Load the built op once (build.py's cache); False, with one warning naming the fix, if it
    is not built. ZEROLM_KERNELS=0 skips it silently."""
    global _loaded
    if _loaded is None:
        _loaded = _try_load()
    return _loaded


def _try_load() -> bool:
    if os.environ.get("ZEROLM_KERNELS", "1") == "0":
        return False
    if hasattr(torch.ops.zerolm, "qlinear"):  # loaded by hand (e.g. a test's own build)
        return True
    lib = library_path()
    if lib is None or not lib.exists():
        log.warning(
            "zerolm's quantized CPU kernel is not built, so quantized layers run the slower "
            "pure-torch path; build it with `python -m zerolm.quant.build`"
        )
        return False
    torch.ops.load_library(str(lib))
    return True


@contextmanager
def path(which: KernelPath) -> Iterator[None]:
    """Force a path for the products run inside the block: "op" raises if the op is not loaded."""
    global _forced
    if which == "op" and not load():
        raise ValueError(
            "the quantized C++ kernel is not built; run `python -m zerolm.quant.build`"
        )
    before, _forced = _forced, which
    try:
        yield
    finally:
        _forced = before


TILE = 16  # rows per tile of the packed layout (csrc/qlinear.cpp kTile)


class Packed(NamedTuple):
    """A weight's codes and scales in the op's decode layout (csrc/qlinear.cpp, "The decode
    layout"): rows padded to whole tiles of 16; per tile and 32-block one run of codes (int8: +128,
    as uint8), then scales and mins (tiles, G, 16) in float16 bits."""

    codes: torch.Tensor  # uint8 (tiles, K/32, 16 * 32 * bits / 8)
    scales: torch.Tensor  # int16 (tiles, G, 16)
    mins: torch.Tensor | None


def _tiles(t: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (tiles, 16, ...), zero rows padding N to whole tiles."""
    pad = -t.shape[0] % TILE
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t.reshape(-1, TILE, *t.shape[1:])


def pack(qw: Quantized, bits: int) -> Packed:
    """The decode layout of `qw`: a byte permutation of its codes (int8 shifted by +128)."""
    # (N, K/32, vectors, 4 bytes): each vector of a tile's block holds 4 bytes of every row
    q = _tiles(qw.qweight.reshape(qw.qweight.shape[0], -1, 8 if bits == 8 else 4, 4))
    if bits == 8:
        q = (q.to(torch.int16) + 128).to(torch.uint8)
    codes = q.permute(0, 2, 3, 1, 4).contiguous().reshape(q.shape[0], q.shape[2], -1)

    def rows(s: torch.Tensor) -> torch.Tensor:
        return _tiles(s.view(torch.int16)).transpose(1, 2).contiguous()

    return Packed(codes, rows(qw.scales), None if qw.mins is None else rows(qw.mins))


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Q(x) in float32: each 32-block of the last dim rounded to int8 codes times absmax / 127,
    computed with the same float32 operations as the C++ op (so the codes are identical)."""
    k = x.shape[-1]
    b = x.float().reshape(*x.shape[:-1], k // BLOCK, BLOCK)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return (torch.round(b * inv) * d).reshape(x.shape)


def _choose(x: torch.Tensor) -> KernelPath:
    if x.requires_grad and torch.is_grad_enabled():
        return "float"
    if _forced != "auto":
        return _forced
    return "op" if x.device.type == "cpu" and load() else "torch"


def linear(
    x: torch.Tensor,  # (..., K)
    qweight: torch.Tensor,
    scales: torch.Tensor,  # (N, G) float16
    mins: torch.Tensor | None,
    bits: int,
    bias: torch.Tensor | None = None,
    packed: Packed | None = None,
) -> torch.Tensor:  # (..., N), x's dtype
    k = x.shape[-1]
    group = check_group(k, k // scales.shape[1])
    which = _choose(x)
    if which == "op" and packed is not None:
        n = qweight.shape[0]
        y = torch.ops.zerolm.qlinear_packed(x, *packed, bits, n, bias)
        return y.to(x.dtype)
    if which == "op":
        y = torch.ops.zerolm.qlinear(
            x, qweight, scales, mins, bits, 0 if group == k else group, bias
        )
        return y.to(x.dtype)
    w = dequantize(Quantized(qweight, scales, mins), bits, torch.float32)
    if which == "float":
        return F.linear(x, w.to(x.dtype), bias)
    b = None if bias is None else bias.float()
    return F.linear(quantize_activations(x), w, b).to(x.dtype)
