"""The quantized matrix product y = x @ W.T + b, W given by its codes and scales (formats.py).

This is the pure-torch path: dequantize W to x's dtype, then one F.linear. It is the reference
every faster kernel must match, and what runs where no such kernel is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zerolm.quant.formats import Quantized, dequantize


def linear(
    x: torch.Tensor,  # (..., K)
    qweight: torch.Tensor,
    scales: torch.Tensor,  # (N, G) float16
    mins: torch.Tensor | None,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # (..., N)
    w = dequantize(Quantized(qweight, scales, mins), bits, x.dtype)
    return F.linear(x, w, bias)
