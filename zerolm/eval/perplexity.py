"""Validation loss, perplexity and bits per byte of a language model on a shard split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zerolm.data.loader import eval_batches
from zerolm.eval.mode import eval_mode
from zerolm.model.protocol import LanguageModel


@torch.no_grad()
def evaluate_lm(
    model: LanguageModel,
    shard_dir: str | Path,
    token_bytes: np.ndarray,
    *,
    split: str = "val",
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
) -> dict:
    """Token-weighted mean loss (nats), perplexity and bits per byte over the split's windows.

    Bits per byte = sum of per-token losses / ln 2 / UTF-8 bytes of the predicted tokens: it
    compares models with different tokenizers on equal terms."""
    seq_len = seq_len or model.cfg.max_seq_len
    device = next(model.parameters()).device
    tb = torch.from_numpy(token_bytes)
    nats, tokens, nbytes = 0.0, 0, 0
    batches = eval_batches(
        shard_dir, split, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches
    )
    with eval_mode(model):
        for x, y in batches:
            logits = model(x.to(device))  # (B, T, V)
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum"
            )
            nats += loss.item()
            tokens += y.numel()
            nbytes += int(tb[y].sum())
    if tokens == 0:
        raise ValueError(f"split {split!r} of {shard_dir} has no tokens to evaluate")
    mean = nats / tokens
    return {
        "val_loss": mean,
        "val_ppl": math.exp(min(mean, 50.0)),
        "val_bpb": nats / math.log(2) / max(nbytes, 1),
    }
