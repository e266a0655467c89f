"""Attention weights of one layer: what each token looks at (the web UI's heatmap)."""
from __future__ import annotations

import math

import torch

from zerolm.model.layers import apply_rope


@torch.inference_mode()
def attention_weights(model, ids: list[int], layer: int) -> torch.Tensor:
    """(H, T, T) softmax(q k^T / sqrt(Dh) + mask) of `layer` for the token ids, float32: row t is
    token t's distribution over tokens 0..t (a sliding window, if any, applies). The queries and
    keys are recomputed from the layer's input, captured while the model runs on ids."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer must be in [0, {cfg.n_layers - 1}], got {layer}")
    if not 1 <= len(ids) <= cfg.max_seq_len:
        raise ValueError(f"give 1 to {cfg.max_seq_len} tokens (the model's window), got {len(ids)}")
    attn = model.blocks[layer].attn
    seen = {}

    def grab(_mod, args, kwargs):
        seen["x"], seen["rope"] = args[0], kwargs.get("rope")

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        handle.remove()
    x, T = seen["x"].float(), len(ids)  # (1, T, D)
    q = attn.q(x).view(1, T, attn.h, attn.dh).transpose(1, 2)  # (1, H, T, Dh)
    k = attn.k(x).view(1, T, attn.kv, attn.dh).transpose(1, 2)  # (1, K, T, Dh)
    if seen["rope"] is not None:
        cos, sin = (t.float() for t in seen["rope"])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.h // attn.kv, dim=1)  # (1, H, T, Dh)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.dh)  # (1, H, T, T)
    pos = torch.arange(T, device=scores.device)
    allowed = pos[None, :] <= pos[:, None]
    if cfg.sliding_window:
        allowed &= pos[:, None] - pos[None, :] < cfg.sliding_window
    return scores.masked_fill(~allowed, -math.inf).softmax(-1)[0]  # (H, T, T)
