"""Loss functions (pure): each returns (mean loss over counted tokens, number of counted tokens as
an int or a 0-d tensor)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(model, batch) -> tuple[torch.Tensor, int]:
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
        n = mask.sum()  # a tensor: an int() here would break a compiled graph; the Trainer converts it
        return (losses * mask).sum() / n.clamp(min=1), n
    return losses.mean(), y.numel()
