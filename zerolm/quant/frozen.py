"""The quantized product y = x @ W.T + b with a gradient for x only (W frozen), for training over
a quantized base (QLoRA, transforms/lora.py).

Through plain autograd, the pure-torch kernel's dequantized W (N, K) would be saved for the
backward of every layer: the whole float base alive at once, which QLoRA exists to avoid. Here
backward saves only the codes and dequantizes again, and both passes work in blocks of output rows
so a large layer (the head: V rows) never holds more than ~4 MB of float weights at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zerolm.quant.formats import Quantized, dequantize

BLOCK_ELEMENTS = 1 << 20  # float weights per block of rows (4 MB in float32)


def _blocks(q: Quantized, k: int) -> list[tuple[int, Quantized]]:
    """(first row, the rows' codes and scales) in blocks of about BLOCK_ELEMENTS weights."""
    n = q.qweight.shape[0]
    rows = max(1, BLOCK_ELEMENTS // k)
    return [
        (s, Quantized(q.qweight[s : s + rows], q.scales[s : s + rows], _rows(q.mins, s, rows)))
        for s in range(0, n, rows)
    ]


def _rows(t: torch.Tensor | None, start: int, rows: int) -> torch.Tensor | None:
    return None if t is None else t[start : start + rows]


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, scales, mins, bits: int, bias):
        k, out = x.shape[-1], None
        for s, b in _blocks(Quantized(qweight, scales, mins), k):
            w = dequantize(b, bits).to(x.dtype)  # x @ dequantize(W).T exactly: backward's function
            y = F.linear(x, w, _rows(bias, s, len(w)))
            if out is None:  # the dtype autocast chose, known from the first block
                n = qweight.shape[0]
                out = y if y.shape[-1] == n else y.new_empty(*x.shape[:-1], n)
            if out is not y:
                out[..., s : s + y.shape[-1]] = y
        ctx.save_for_backward(qweight, scales, mins)
        ctx.bits, ctx.x_dtype, ctx.k = bits, x.dtype, k
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (..., N) -> d x (..., K); nothing for the frozen weights
        qweight, scales, mins = ctx.saved_tensors
        gx = None
        for s, b in _blocks(Quantized(qweight, scales, mins), ctx.k):
            w = dequantize(b, ctx.bits, grad.dtype)  # (rows, K)
            part = grad[..., s : s + len(w)] @ w
            gx = part.float() if gx is None else gx.add_(part)
        assert gx is not None
        return gx.to(ctx.x_dtype), None, None, None, None, None


def frozen_linear(
    x: torch.Tensor, q: Quantized, bits: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) @ dequantize(q).T + bias -> (..., N), differentiable in x only."""
    return _FrozenLinear.apply(x, q.qweight, q.scales, q.mins, bits, bias)
