"""Reward model: a zerolm decoder (initialised from an SFT model) with a scalar head that scores a
whole conversation at its last token; trained on preference pairs with the pairwise loss
-log sigmoid(r_chosen - r_rejected) (zerolm/align/losses.py).

A model directory holds the decoder as usual (config.json, model.safetensors, tokenizer.json)
plus `reward_head.safetensors` (the (1, D) weight and bias of the head).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
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


def _pair_rewards(model: RewardModel, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), of a batch laid out as PairBatches makes it."""
    device = next(model.parameters()).device
    ids, lengths = (t.to(device) for t in batch)
    r = model(ids, lengths)  # (2B,)
    return r[: len(r) // 2], r[len(r) // 2 :]


def reward_loss(model: RewardModel, batch) -> tuple[torch.Tensor, int]:
    """The Trainer's loss: pairwise loss over the batch's pairs; n = number of pairs."""
    r_c, r_r = _pair_rewards(model, batch)
    return pairwise_loss(r_c, r_r)[0], len(r_c)


@torch.no_grad()
def reward_eval(model: RewardModel, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16) -> dict:
    """Held-out pairwise loss and accuracy (share of pairs where the chosen reply scores higher)."""
    was = model.training
    model.eval()
    loss_sum, acc_sum = 0.0, 0.0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        loss, acc = pairwise_loss(*_pair_rewards(model, pad_batch([c for c, _ in chunk] + [r for _, r in chunk])))
        loss_sum += loss.item() * len(chunk)
        acc_sum += acc.item() * len(chunk)
    model.train(was)
    return {"val_loss": loss_sum / len(pairs), "val_accuracy": acc_sum / len(pairs)}


# ---------------------------------------------------------------- the `zerolm reward` stage
def poem_docs_dir(cfg) -> Path:
    """Prepared docs/ for the poem pairs: align.poem_docs, else next to the base model's run."""
    base = Path(cfg.align.base_model)
    candidates = [Path(cfg.align.poem_docs)] if cfg.align.poem_docs else [base.parent / "docs", base.parent.parent / "docs"]
    for d in candidates:
        if (d / "train.jsonl").is_file() and (d / "val.jsonl").is_file():
            return d
    raise ValueError(f"the 'poems' pairs need prepared documents with title/author metadata; none at "
                     f"{', '.join(str(c) for c in candidates)}: set --align.poem_docs=RUN/docs")


def load_pairs(cfg, model, tok) -> tuple[list[Pair], list[Pair], dict]:
    """(train, val) pairs from align.data files, align.builtin sets and counts per source.
    Files and hhh are split by a hash of the pair; poem pairs are sampled from `model` on
    requests from the training documents (train) and the held-out ones (val)."""
    from zerolm.align.data import BUILTIN_PAIRS, keep_distinct, read_builtin_pairs, read_pairs
    from zerolm.data.poems import eval_requests
    from zerolm.data.prepare import read_docs, split_key

    a = cfg.align
    for name in a.builtin:
        if name not in (*BUILTIN_PAIRS, "poems"):
            raise ValueError(f"unknown preference set {name!r}; bundled: poems, {', '.join(BUILTIN_PAIRS)}")
    if not a.data and not a.builtin:
        raise ValueError("no preference pairs: give --align.data=FILE.jsonl and/or --align.builtin=poems,hhh")
    train, val, counts = [], [], {}

    def split(pairs, name):
        for p in pairs:
            key = json.dumps([p.messages, p.chosen, p.rejected], ensure_ascii=False)
            (val if split_key(key) < a.val_fraction else train).append(p)
        counts[name] = len(pairs)

    def add(name, pairs, skipped):
        split(pairs, name)
        if skipped:
            counts[f"{name} (identical, skipped)"] = skipped

    for path in a.data:
        add(str(path), *read_pairs(path))
    for name in a.builtin:
        if name == "poems":
            docs = poem_docs_dir(cfg)
            tr, tr_counts = _poems(model, tok, eval_requests(read_docs(docs / "train.jsonl"), cfg.seed,
                                                             a.poem_requests), cfg)
            va, va_counts = _poems(model, tok, eval_requests(read_docs(docs / "val.jsonl"), cfg.seed,
                                                             a.poem_val_requests), cfg)
            train += tr
            val += va
            counts["poems"] = {"train": tr_counts, "val": va_counts}
        else:
            add(name, *keep_distinct(read_builtin_pairs(name), name))
    return train, val, counts


def _poems(model, tok, items, cfg):
    from zerolm.align.poems import poem_pairs

    return poem_pairs(model, tok, items, samples=cfg.align.samples, seed=cfg.seed)


def train_reward(cfg, progress: bool = True) -> dict:
    """`zerolm reward`: the SFT model + a scalar head, trained on preference pairs; OUT/model."""
    import logging

    from zerolm.config import save_config
    from zerolm.infer.engine import decode_layout
    from zerolm.inspect.accounting import account
    from zerolm.train.checkpoint import list_checkpoints
    from zerolm.train.trainer import Trainer

    log = logging.getLogger(__name__)
    if not cfg.align.base_model:
        raise ValueError("no base model: give --align.base_model=DIR (an SFT model, e.g. runs/speedrun/sft/model)")
    out, base = Path(cfg.out_dir), Path(cfg.align.base_model)
    if list_checkpoints(out) and not cfg.train.resume:
        raise ValueError(f"{out} already holds checkpoints: continue with --train.resume=true, or use a new --out")
    tok = Tokenizer.load(base)
    sampler = decode_layout(load_model(base))  # samples the poem answers; the reward model trains its own copy
    train_p, val_p, counts = load_pairs(cfg, sampler, tok)
    max_len = sampler.cfg.max_seq_len
    del sampler
    enc = {name: [e for p in ps if (e := encode_pair(tok, p, max_len)) is not None]
           for name, ps in (("train", train_p), ("val", val_p))}
    too_long = len(train_p) + len(val_p) - len(enc["train"]) - len(enc["val"])
    log.info("preference pairs: %s; train %d, val %d (%d skipped: longer than the %d-token window)",
             counts, len(enc["train"]), len(enc["val"]), too_long, max_len)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    rm = RewardModel(load_model(base))
    eval_fn = partial(reward_eval, pairs=enc["val"], batch_size=cfg.train.batch_size) if enc["val"] else None
    trainer = Trainer(rm, cfg.train, out, batches=PairBatches(enc["train"], cfg.train.batch_size, cfg.seed),
                      loss_fn=reward_loss, eval_fn=eval_fn,
                      flops_per_token=account(rm.body)["train_flops_per_token"], progress=progress)
    row = trainer.fit()
    final = reward_eval(rm, enc["val"]) if enc["val"] else {}
    rm.save(out / "model", tok)
    log.info("held-out pairwise accuracy: %s", final.get("val_accuracy"))
    return {**row, **{f"final_{k}": v for k, v in final.items()}, "model_dir": str(out / "model"), "pairs": counts,
            "train_pairs": len(enc["train"]), "val_pairs": len(enc["val"]), "too_long": too_long}
