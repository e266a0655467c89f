"""Attention weights of one layer: what each token looks at (the web UI's heatmap)."""

from __future__ import annotations

import math

import torch

from zerolm.model.attention import attention_mask


@torch.inference_mode()
def attention_weights(model, ids: list[int], layer: int) -> torch.Tensor:
    """(H, T, T) softmax(q k^T / sqrt(Dh) + mask) of `layer` for the token ids, float32: row t is
    token t's distribution over tokens 0..t (a sliding window, if any, applies).

    A pure function of the model's weights: it runs the embeddings and the blocks below `layer`
    itself, as a forward pass does, then that layer's queries and keys, with no hook or state on
    the model, so it may run while other threads (the server's scheduler) use the same model."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer must be in [0, {cfg.n_layers - 1}], got {layer}")
    if not 1 <= len(ids) <= cfg.max_seq_len:
        raise ValueError(f"give 1 to {cfg.max_seq_len} tokens (the model's window), got {len(ids)}")
    bad = next(
        (
            j
            for j, t in enumerate(ids)
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size
        ),
        None,
    )
    if bad is not None:
        raise ValueError(
            f"token {bad} is {ids[bad]!r}: token ids must be integers in [0, {cfg.vocab_size})"
        )
    dev, T = next(model.parameters()).device, len(ids)
    pos = torch.arange(T, device=dev)
    x, rope = model.embed(torch.tensor([ids], device=dev), pos)  # (1, T, D)
    mask = attention_mask(T, dev, cfg.sliding_window)
    for block in model.blocks[:layer]:
        x = block(x, rope=rope, mask=mask)  # (1, T, D)
    block = model.blocks[layer]
    attn = block.attn
    x = (block.norm1(x) if block.pre else x).float()  # the attention's input
    rope = None if rope is None else (rope[0].float(), rope[1].float())
    q, k, _ = attn.project(x, rope)  # (1, H, T, Dh), (1, K, T, Dh), rotated; split or fused
    k = k.repeat_interleave(attn.h // attn.kv, dim=1)  # (1, H, T, Dh)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.dh)  # (1, H, T, T)
    allowed = pos[None, :] <= pos[:, None]
    if cfg.sliding_window:
        allowed &= pos[:, None] - pos[None, :] < cfg.sliding_window
    return scores.masked_fill(~allowed, -math.inf).softmax(-1)[0]  # (H, T, T)
