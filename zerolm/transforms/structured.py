"""Structured pruning: remove the least important FFN channels and attention kv groups of every
block, giving a physically smaller dense model (a smaller d_ff, n_heads and n_kv_heads in its
config); `zerolm prune` then optionally recovers with a short fine-tune on the one Trainer
(commands/prune.py: train/ ranks above transforms/).

Importance of a unit (an FFN channel, or a kv group: one kv head with the query heads that read
it) is the Frobenius norm, over the calibration tokens, of what the unit adds to the residual
stream: ||h_c||_2 · ||W_down[:, c]||_2 for FFN channel c (h_c its activation, the down projection's
input), and ||Y_g W_o[:, g]^T||_F for kv group g (Y_g its heads' attention outputs). It is zero
exactly when removing the unit leaves the block's output on that text unchanged. Blocks are
calibrated in order, each on the output of the already pruned blocks before it.

zerolm's config holds one d_ff and one head count for all blocks, so every block loses the same
number of channels and groups (each its own lowest). Query heads go with their kv group, so
grouped-query attention keeps n_heads / n_kv_heads.

Legend: M calibration tokens, D d_model, F d_ff, H query heads, K kv heads, Dh head size,
r = H / K.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from zerolm.config import PruneConfig
from zerolm.model.io import load_state
from zerolm.model.presets import ResolvedModelConfig, resolve
from zerolm.model.transformer import Block, Transformer
from zerolm.transforms.prune import calibrated_blocks, check_prunable, input_stats, sum_sq


def removed_counts(cfg: ResolvedModelConfig, prune: PruneConfig) -> tuple[int, int]:
    """(FFN channels, kv groups) removed from every block; ValueError for fractions outside [0, 1),
    a fraction that removes nothing, or one that would remove every head."""
    for key in ("ffn_fraction", "heads_fraction"):
        value = getattr(prune, key)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--prune.{key}={value} must be in [0, 1): the share removed")
    ffn = round(prune.ffn_fraction * cfg.d_ff)
    groups = round(prune.heads_fraction * cfg.n_kv_heads)
    if prune.heads_fraction and groups >= cfg.n_kv_heads:
        raise ValueError(
            f"--prune.heads_fraction={prune.heads_fraction} would remove all {cfg.n_kv_heads} kv "
            f"groups of every block: use at most {(cfg.n_kv_heads - 1) / cfg.n_kv_heads:.3f}"
        )
    if prune.heads_fraction and not groups:
        raise ValueError(
            f"--prune.heads_fraction={prune.heads_fraction} of {cfg.n_kv_heads} kv groups rounds "
            f"to none: use at least {0.5 / cfg.n_kv_heads:.3f}, or 0"
        )
    if prune.ffn_fraction and not ffn:
        raise ValueError(f"--prune.ffn_fraction={prune.ffn_fraction} of {cfg.d_ff} rounds to none")
    if not ffn and not groups:
        raise ValueError("structured pruning needs --ffn-fraction or --heads-fraction above 0")
    return ffn, groups


def pruned_config(cfg: ResolvedModelConfig, ffn: int, groups: int) -> ResolvedModelConfig:
    """The config of the smaller model (head_dim stays as it was: it is explicit once resolved)."""
    r = cfg.n_heads // cfg.n_kv_heads
    kv = cfg.n_kv_heads - groups
    return resolve(
        dataclasses.replace(
            cfg, d_ff=cfg.d_ff - ffn, n_kv_heads=kv, n_heads=kv * r, head_dim=cfg.head_dim
        )
    )


@torch.no_grad()
def importance(block: Block, x: torch.Tensor, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(F,) FFN channel and (K,) kv group importances of `block` on its input x (B, T, D)."""
    attn, down = block.attn, block.ffn.down
    wo = attn.o.weight.float().view(-1, attn.kv, (attn.h // attn.kv) * attn.dh)  # (D, K, r·Dh)

    def group_sq(a: torch.Tensor) -> torch.Tensor:  # o's input (M, H·Dh) -> (K,)
        y = a.view(a.shape[0], attn.kv, -1)  # (M, K, r·Dh): a group's heads are contiguous
        return torch.einsum("mkc,dkc->mkd", y, wo).pow(2).sum((0, 2))

    sums = input_stats(block, x, kw, {"attn.o": group_sq, "ffn.down": sum_sq})  # (K,), (F,)
    ffn = sums["ffn.down"].sqrt() * down.weight.float().norm(dim=0)  # (F,)
    return ffn, sums["attn.o"].sqrt()


def _kept(score: torch.Tensor, removed: int) -> torch.Tensor:
    """Indices of the units kept (all but the `removed` lowest scores), in their original order."""
    return score.topk(len(score) - removed).indices.sort().values


def sliced_state(block: Block, channels: torch.Tensor, groups: torch.Tensor) -> dict:
    """block's state_dict with only the kept FFN channels and kv groups' rows / columns."""
    attn = block.attn
    r, dh = attn.h // attn.kv, attn.dh
    kv_rows = (groups[:, None] * dh + torch.arange(dh)).flatten()  # k / v rows of kept groups
    q_rows = (groups[:, None] * r * dh + torch.arange(r * dh)).flatten()  # their query heads
    rows = {"attn.q": q_rows, "attn.k": kv_rows, "attn.v": kv_rows}
    rows |= {"ffn.up": channels, "ffn.gate": channels}
    cols = {"attn.o": q_rows, "ffn.down": channels}
    out = {}
    for key, t in block.state_dict().items():
        mod, kind = key.rsplit(".", 1)
        if mod in rows:
            t = t.index_select(0, rows[mod].to(t.device))
        elif mod in cols and kind == "weight":
            t = t.index_select(1, cols[mod].to(t.device))
        out[key] = t.contiguous()
    return out


@torch.no_grad()
def prune_structured(model: nn.Module, cfg: PruneConfig, calib: torch.Tensor) -> Transformer:
    """Remove the lowest-importance FFN channels and kv groups of every block (cfg.ffn_fraction,
    cfg.heads_fraction), in place: the blocks are replaced by smaller ones and model.cfg updated.
    calib: (B, T) token ids of calibration text. Returns the model."""
    check_prunable(model, cfg)
    assert isinstance(model, Transformer)
    if getattr(model.blocks[0].attn, "wqkv", None) is not None or hasattr(
        model.blocks[0].ffn, "gate_up"
    ):
        raise ValueError("prune the training layout (load_model's), not a decode_layout model")
    ffn, groups = removed_counts(model.cfg, cfg)
    new_cfg = pruned_config(model.cfg, ffn, groups)
    was_training = model.training
    model.eval()
    for i, block, x, kw in calibrated_blocks(model, calib):
        assert isinstance(block, Block)
        ffn_score, group_score = importance(block, x, kw)
        state = sliced_state(block, _kept(ffn_score, ffn), _kept(group_score, groups))
        with torch.device("meta"):
            small = Block(new_cfg)
        load_state(small, state, f"block {i}")
        model.blocks[i] = small
    model.cfg = new_cfg
    model.train(was_training)
    return model
