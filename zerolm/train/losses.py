"""Loss functions (pure): each returns a LossResult (mean loss over the counted tokens, their
number, and the loss's own figures to log)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from zerolm.model.layers import matmul_dtype


@dataclasses.dataclass
class LossResult:
    """What a stage's loss returns to the Trainer: `loss` (the mean over the batch's counted
    tokens), `n` (their number: an int, or a 0-d tensor inside a compiled graph) and `stats`
    (0-d tensors, e.g. DPO's margin, logged as their mean over the step); `weight`: what `loss`
    is a mean over where that is not n (DPO: the pairs), which weights each rank's loss under
    distribution."""

    loss: torch.Tensor
    n: torch.Tensor | int
    stats: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    weight: torch.Tensor | int | None = None


def lm_loss(model: nn.Module, batch) -> LossResult:
    """Next-token cross entropy; batch = (x, y) of (B, T) ids, or (x, y, mask) with mask (B, T)
    selecting the target positions that count (e.g. assistant tokens in SFT), or (x, y, mask,
    positions, segments) for packed rows (zerolm.data.sft)."""
    x, y, *rest = batch
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    packed = {}
    if len(rest) == 3:
        packed = {"positions": rest[1].to(device), "segments": rest[2].to(device)}
    logits = model(x, **packed)  # (B, T, V)
    losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (B*T,)
    if rest:
        mask = rest[0].to(device).flatten().float()
        n = (
            mask.sum()
        )  # a tensor: an int() here would break a compiled graph; the Trainer converts it
        return LossResult((losses * mask).sum() / n.clamp(min=1), n)
    return LossResult(losses.mean(), y.numel())


def _chunk_rows(vocab: int) -> int:
    """Rows per chunk so one float32 (rows, V) logit block stays near 16 MB: below glibc's mmap
    threshold (32 MB), so its memory is reused from the heap instead of being mapped and faulted
    in afresh each step (which cost ~20 % of a step as system time in the translation recipe)."""
    return max(64, (1 << 22) // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over rows of cross_entropy(h @ w.T + b, y, label_smoothing), computed block by block of
    rows; backward recomputes each block's logits instead of keeping (N, V) of them."""

    @staticmethod
    def forward(ctx, h, w, b, y, smoothing: float, dtype: torch.dtype):
        n, c = h.shape[0], _chunk_rows(w.shape[0])
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), w.to(dtype)
            bc = None if b is None else b.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            lses = []
            for s in range(0, n, c):
                z = F.linear(hc[s : s + c], wc, bc).float()  # (C, V)
                lse = torch.logsumexp(z, dim=-1)  # (C,)
                nll = lse - z.gather(1, y[s : s + len(z), None])[:, 0]
                if smoothing:
                    nll = (1 - smoothing) * nll + smoothing * (lse - z.mean(-1))
                total += nll.sum()
                lses.append(lse)
        ctx.save_for_backward(hc, wc, bc, y, torch.cat(lses))
        ctx.smoothing, ctx.w_dtype = smoothing, w.dtype
        ctx.b_dtype = None if b is None else b.dtype
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad):
        hc, wc, bc, y, lse = ctx.saved_tensors
        n, V, eps = hc.shape[0], wc.shape[0], ctx.smoothing
        c = _chunk_rows(V)
        gh = torch.empty_like(hc)
        gw = torch.zeros(wc.shape, dtype=torch.float32, device=wc.device)
        gb = (
            torch.zeros(V, dtype=torch.float32, device=wc.device)
            if ctx.needs_input_grad[2]
            else None
        )
        scale = grad.float() / max(n, 1)
        with torch.autocast(hc.device.type, enabled=False):
            for s in range(0, n, c):
                hs = hc[s : s + c]
                p = torch.exp(
                    F.linear(hs, wc, bc).float() - lse[s : s + len(hs), None]
                )  # softmax (C, V)
                p.scatter_add_(
                    1,
                    y[s : s + len(hs), None],
                    torch.full((len(hs), 1), eps - 1.0, device=p.device),
                )
                if eps:
                    p -= eps / V
                gz = (p * scale).to(hc.dtype)  # d loss / d logits
                gh[s : s + len(hs)] = gz @ wc
                gw += (gz.T @ hs).float()
                if gb is not None:
                    gb += gz.float().sum(0)
        return (
            gh,
            gw.to(ctx.w_dtype),
            None if gb is None else gb.to(ctx.b_dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden, weight, bias, target, *, ignore_index: int = -100, label_smoothing: float = 0.0
):
    """F.cross_entropy(F.linear(hidden, weight, bias).float(), target, ignore_index=...,
    label_smoothing=...) for hidden (..., D), weight (V, D), target (...): the same mean loss and
    gradients, without materialising the (N, V) logits (and their float32 copy, softmax and
    gradient). Rows whose target is ignore_index are dropped first. The matmuls run in the dtype
    autocast would use (bf16 under CPU autocast), the softmax in float32."""
    keep = target.reshape(-1) != ignore_index
    h = hidden.reshape(-1, hidden.shape[-1])[keep]  # (N, D)
    y = target.reshape(-1)[keep]  # (N,)
    return _LinearCrossEntropy.apply(h, weight, bias, y, float(label_smoothing), matmul_dtype(h))
