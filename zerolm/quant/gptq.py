"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): the codes of one linear layer chosen column by
column, each column's rounding error pushed onto the columns not yet quantized, weighted by the
inverse Hessian of the layer's squared output error on calibration inputs.

Legend: N output rows, K inputs (columns), g weights per scale group.

Pure math on a weight (N, K) and H = 2 X^T X / n (K, K) of its inputs X (n, K); the codes are
formats.py's (Q8_0 / Q4_0 / Q4_1 layout), so a GPTQ model stores, runs and exports as an RTN one.
"""

from __future__ import annotations

import torch

from zerolm.quant.formats import Quantized, Scheme, check_group, pack_int4, quantize, quantize_with

BLOCK_COLUMNS = 128  # the reference's lazy batch: error feedback beyond it is applied per block


def hessian_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U (float64) of (H + damp * mean(diag H) * I)^-1, where a dead
    column (diag 0: an input that never fired; GPTQ zeroes its weights) gets diagonal 1."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    k = h.shape[0]
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    low = torch.linalg.cholesky(h)
    inv = torch.cholesky_inverse(low)
    return torch.linalg.cholesky(inv, upper=True)


def _dequant_column(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, bits: int):
    """The float values (N,) of one column's codes under its group's scale d (and min m)."""
    qf = q.float()
    if bits == 8:
        return qf * d
    return qf * d + m if m is not None else (qf - 8) * d


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group: int,
    scheme: Scheme = "sym",
    damp: float = 0.01,
    act_order: bool = False,
) -> Quantized:
    """GPTQ codes of w (N, K) given H (K, K). Scales of a group come from the error-updated weights
    when its first column is reached (the reference's groups mode); with act_order, columns go in
    order of decreasing H diagonal and scales are fixed up front from w (static groups), so the
    stored layout is formats.py's either way."""
    n, k = w.shape
    g = check_group(k, group)
    wk = w.detach().float().clone()
    wk[:, torch.diagonal(h) == 0] = 0
    scales = torch.zeros(n, k // g)
    mins = torch.zeros(n, k // g) if bits == 4 and scheme == "asym" else None
    order = torch.arange(k)
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        _set_scales(wk, scales, mins, bits, g, scheme, range(k // g))
        wk, h = wk[:, order], h[order][:, order]
    u = hessian_inverse_factor(h, damp).float()
    q = torch.zeros(n, k, dtype=torch.int8 if bits == 8 else torch.uint8)
    step = max(BLOCK_COLUMNS // g, 1) * g  # whole groups per lazy block
    for b0 in range(0, k, step):
        b1 = min(b0 + step, k)
        err = _quantize_block(wk, u, q, scales, mins, order, b0, b1, bits, g, scheme, act_order)
        wk[:, b1:] -= err @ u[b0:b1, b1:]
    if act_order:
        q = q[:, torch.argsort(order)]
    codes = q if bits == 8 else pack_int4(q)
    return Quantized(codes, scales.half(), None if mins is None else mins.half())


def _set_scales(wk, scales, mins, bits: int, g: int, scheme: Scheme, groups) -> None:
    """RTN's scales (float16-rounded, as stored) of the given groups of wk's current values."""
    for j in groups:
        qw = quantize(wk[:, j * g : (j + 1) * g], bits, g, scheme)
        scales[:, j] = qw.scales[:, 0].float()
        if mins is not None:
            assert qw.mins is not None
            mins[:, j] = qw.mins[:, 0].float()


def _quantize_block(wk, u, q, scales, mins, order, b0, b1, bits, g, scheme, act_order):
    """Quantize columns b0..b1 of wk in place (error feedback within the block); returns the
    block's scaled errors (N, b1 - b0) for the lazy update of the columns after it."""
    w1 = wk[:, b0:b1].clone()
    u1 = u[b0:b1, b0:b1]
    err = torch.zeros_like(w1)
    for i in range(b1 - b0):
        col = b0 + i
        if not act_order and col % g == 0:  # a group starts: scales from the updated weights
            wk[:, b0:b1] = w1
            _set_scales(wk, scales, mins, bits, g, scheme, [col // g])
        j = int(order[col]) // g
        d = scales[:, j : j + 1]
        m = None if mins is None else mins[:, j : j + 1]
        qc = quantize_with(w1[:, i : i + 1], d, m, bits)
        q[:, col] = qc[:, 0]
        e = w1[:, i] - _dequant_column(qc[:, 0], d[:, 0], None if m is None else m[:, 0], bits)
        e = e / u1[i, i]
        w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
        err[:, i] = e
    wk[:, b0:b1] = w1
    return err
