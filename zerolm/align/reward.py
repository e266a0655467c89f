"""Reward model: a zerolm decoder (initialised from an SFT model) with a scalar head that scores a
whole conversation at its last token; trained on preference pairs with the pairwise loss
-log sigmoid(r_chosen - r_rejected) (zerolm/align/losses.py).

A model directory holds the decoder as usual (config.json, model.safetensors, tokenizer.json)
plus `reward_head.safetensors` (the (1, D) weight and bias of the head).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from zerolm.align.data import Pair
from zerolm.align.losses import pairwise_loss
from zerolm.files import atomic_write_bytes
from zerolm.model import load_model, save_model
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import render

HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.cfg = body.cfg
        self.head = nn.Linear(body.cfg.d_model, 1)
        nn.init.zeros_(self.head.weight)  # every conversation starts at reward 0
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) real tokens -> (B,) rewards read at each last real
        token (causal attention: padding after it changes nothing)."""
        h = self.body.hidden(ids)  # (B, T, D)
        last = h[torch.arange(len(ids), device=ids.device), lengths - 1]  # (B, D)
        return self.head(last.float()).squeeze(-1)

    def save(self, out_dir: str | Path, tok: Tokenizer) -> Path:
        out = Path(out_dir)
        save_model(self.body, out, tok)
        tensors = {"weight": self.head.weight.detach().float().contiguous(), "bias": self.head.bias.detach().float()}
        atomic_write_bytes(out / HEAD_FILE, save(tensors))
        return out

    @classmethod
    def load(cls, model_dir: str | Path) -> RewardModel:
        path = Path(model_dir) / HEAD_FILE
        if not path.is_file():
            raise ValueError(f"{model_dir} is not a reward model (no {HEAD_FILE}); train one with `zerolm reward`")
        rm = cls(load_model(model_dir))
        head = load_file(str(path))
        rm.head.weight.data.copy_(head["weight"])
        rm.head.bias.data.copy_(head["bias"])
        return rm.eval()


def encode_pair(tok: Tokenizer, pair: Pair, max_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids of the conversation ending in the chosen reply and in the rejected one (each
    with its <|end|>); None when either does not fit in max_len tokens."""
    out = []
    for reply in (pair.chosen, pair.rejected):
        ids = render(tok, [*pair.messages, {"role": "assistant", "content": reply}])[0]
        if len(ids) > max_len:
            return None
        out.append(ids)
    return out[0], out[1]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded, lengths (B,))."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


class PairBatches:
    """Infinite, resumable iterator of batches of encoded pairs: (ids, lengths) with the B chosen
    conversations first and the B rejected ones after them."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], batch_size: int, seed: int = 0):
        if not pairs:
            raise ValueError("no preference pairs fit the model window")
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self):
        return np.random.default_rng(self.seed + self.epoch).permutation(len(self.pairs))

    def __iter__(self):
        return self

    def __next__(self):
        order, picked = self._order(), []
        while len(picked) < self.batch_size:
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order()
            picked.append(self.pairs[order[self.pos]])
            self.pos += 1
        return pad_batch([c for c, _ in picked] + [r for _, r in picked])

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


def reward_loss(model: RewardModel, batch) -> tuple[torch.Tensor, int]:
    """The Trainer's loss: pairwise loss over the batch's pairs; n = number of pairs."""
    ids, lengths = (t.to(next(model.parameters()).device) for t in batch)
    r = model(ids, lengths)  # (2B,)
    B = len(r) // 2
    loss, _ = pairwise_loss(r[:B], r[B:])
    return loss, B


@torch.no_grad()
def reward_eval(model: RewardModel, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16) -> dict:
    """Held-out pairwise loss and accuracy (share of pairs where the chosen reply scores higher)."""
    was = model.training
    model.eval()
    losses, accs, n = [], [], 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        ids, lengths = pad_batch([c for c, _ in chunk] + [r for _, r in chunk])
        r = model(ids.to(next(model.parameters()).device), lengths.to(ids.device))
        loss, acc = pairwise_loss(r[: len(chunk)], r[len(chunk) :])
        losses.append(loss.item() * len(chunk))
        accs.append(acc.item() * len(chunk))
        n += len(chunk)
    model.train(was)
    return {"val_loss": sum(losses) / n, "val_accuracy": sum(accs) / n}
