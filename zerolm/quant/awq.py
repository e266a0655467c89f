"""AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware int4. Input channels that carry large
activations are scaled up before rounding (w * s, with 1/s folded into the op that feeds the
layer, so the float model is unchanged), which shrinks their relative rounding error; then each
group's range is clipped where that lowers the output error.

Legend: N output rows, K inputs, G groups per row, g weights per group, s (K,) channel scales.

Pure math on weights, activation statistics (mean |x| per channel, H = X^T X / n) and a loss
callback; the model walk (which layers share an input, where 1/s folds) is transforms/calibrate.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from zerolm.quant.formats import Scheme, check_group, dequantize, quantize


def fake_quant(w: torch.Tensor, bits: int, group: int, scheme: Scheme) -> torch.Tensor:
    """w (N, K) rounded to its codes and back (float32): what the quantized layer computes with."""
    return dequantize(quantize(w, bits, group, scheme), bits)


def scale_candidates(x_mean: torch.Tensor, grid: int) -> list[tuple[float, torch.Tensor]]:
    """(alpha, s) for alpha = 0, 1/grid, ... (grid - 1)/grid: s = mean|x| ** alpha, normalised so
    max * min = 1 (the reference's grid; alpha 0 is s = 1, plain round-to-nearest)."""
    out = []
    for i in range(grid):
        alpha = i / grid
        s = x_mean.float().pow(alpha).clamp(min=1e-4)
        out.append((alpha, s / (s.max() * s.min()).sqrt()))
    return out


def search_scales(
    x_mean: torch.Tensor, loss: Callable[[torch.Tensor], float], grid: int
) -> tuple[torch.Tensor, float, list[float]]:
    """(s, alpha, losses): the candidate scale with the lowest loss(s), where loss(s) is the output
    error of the layers quantized as fake_quant(w * s) / s (s = 1 is in the grid, so AWQ never
    loses to round-to-nearest on this objective)."""
    best: tuple[float, float, torch.Tensor] | None = None
    losses = []
    for alpha, s in scale_candidates(x_mean, grid):
        err = loss(s)
        losses.append(err)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None, "awq_grid must be at least 1"
    return best[2], best[1], losses


def scaled_weight_error(
    ws: Sequence[torch.Tensor], h: torch.Tensor, bits: int, group: int, scheme: Scheme
) -> Callable[[torch.Tensor], float]:
    """loss(s) = the summed squared output error of layers ws on inputs with X^T X / n = h, each
    stored as fake_quant(w * s) / s: tr(dW H dW^T), exact for all tokens at K x K cost."""
    h = h.float()

    def loss(s: torch.Tensor) -> float:
        total = 0.0
        for w in ws:
            dw = w.float() - fake_quant(w.float() * s, bits, group, scheme) / s
            total += float(((dw @ h) * dw).sum())
        return total

    return loss


def clip_search(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group: int,
    scheme: Scheme,
    steps: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """w (N, K) with each group's range shrunk to the ratio (1, 1 - 1/steps, ... > 1 - max_shrink)
    whose rounding gives the lowest output error of that group, dW_g H_gg dW_g^T (the reference's
    per-group objective, from H's diagonal blocks). Quantizing the result gives AWQ's codes."""
    n, k = w.shape
    g = check_group(k, group)
    wf = w.detach().float()
    x = wf.reshape(n, k // g, g)
    idx = torch.arange(k).reshape(k // g, g)
    hb = h.float()[idx[:, :, None], idx[:, None, :]]  # (G, g, g)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if bits == 8 or scheme == "sym":
        hi = torch.maximum(hi.abs(), lo.abs())
        lo = -hi
    best_err = torch.full((n, k // g), float("inf"))
    best = x.clone()
    for i in range(int(max_shrink * steps)):
        r = 1 - i / steps
        xc = torch.minimum(torch.maximum(x, lo * r), hi * r)
        d = x - fake_quant(xc.reshape(n, k), bits, g, scheme).reshape(n, k // g, g)
        err = torch.einsum("ngi,gij,ngj->ng", d, hb, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], xc, best)
    return best.reshape(n, k)
