"""`zerolm sft`: a base model + conversations -> a chat model in OUT/model (full or LoRA).

A stage on the one Trainer: its own batches (packed conversations, loss on assistant tokens
only) and loss (optionally + lambda * the pretraining loss on the base model's shards).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zerolm.config import Config
from zerolm.data.chat_corpora import read_chat_corpus
from zerolm.data.loader import TokenBatches
from zerolm.data.sft import SFTBatches, encode_conversations, fill_rate, pack, read_located
from zerolm.data.shards import load_meta
from zerolm.data.split import split_by_hash
from zerolm.eval.mode import eval_mode
from zerolm.infer.chat import chat_request, replies
from zerolm.infer.sampling import SamplingParams
from zerolm.inspect.accounting import account
from zerolm.model import read_model_config
from zerolm.model.protocol import LanguageModel
from zerolm.tasks import TASKS
from zerolm.tokenizer import Tokenizer
from zerolm.train.fingerprint import stage_fingerprint
from zerolm.train.losses import LossResult, lm_loss
from zerolm.train.run import (
    Stage,
    StageResult,
    begin,
    load_trainable,
    open_out,
    run,
    save_trainable,
)

log = logging.getLogger(__name__)

BUILTIN = ("poems", "chitchat", "chatterbot-en", "chatterbot-zh")


def _split(located: list, val_fraction: float) -> tuple[list, list]:
    """By a hash of the conversation: deterministic and independent of order."""
    return split_by_hash(located, lambda c: json.dumps(c[1], ensure_ascii=False), val_fraction)


def _cap(items: list, n: int, seed: int) -> list:
    if not n or len(items) <= n:
        return items
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in keep]


def _labelled(name: str, conversations: list) -> list[tuple[str, list[dict]]]:
    return [(f"{name} conversation {i}", c) for i, c in enumerate(conversations)]


def located_sources(cfg: Config) -> tuple[list, list, dict]:
    """(train, val) ("file:line" or "set conversation i", conversation) pairs from the data files
    and builtin sets, and counts per source."""
    s = cfg.sft
    train, val, counts = [], [], {}
    sources = [(str(f), None) for f in s.data] + [(name, name) for name in s.builtin]
    if not sources:
        raise ValueError(
            "no SFT data: give --sft.data=FILE.jsonl and/or --sft.builtin=poems,chitchat,..."
        )
    for label, builtin in sources:
        if builtin is None:
            tr, va = _split(read_located(label), s.val_fraction)
        elif builtin in TASKS:
            tr, va = (_labelled(builtin, c) for c in TASKS[builtin].sft_conversations(cfg))
        elif builtin in BUILTIN:
            rows = [row["messages"] for row in read_chat_corpus(builtin)]
            tr, va = _split(_labelled(builtin, rows), s.val_fraction)
        else:
            raise ValueError(
                f"unknown builtin SFT set {builtin!r}; choose from {', '.join(BUILTIN)}"
            )
        tr = _cap(tr, s.max_per_source, cfg.seed)
        va = _cap(va, max(1, s.max_per_source // 10) if s.max_per_source else 0, cfg.seed)
        counts[label] = {"train": len(tr), "val": len(va)}
        train += tr
        val += va
    return train, val, counts


def load_sources(cfg: Config) -> tuple[list, list, dict]:
    """(train, val) conversations from the data files and builtin sets, and counts per source."""
    train, val, counts = located_sources(cfg)
    return [c for _, c in train], [c for _, c in val], counts


@torch.no_grad()
def sft_eval(
    model: LanguageModel, examples, batch_size: int = 16, seq_len: int | None = None
) -> dict:
    """Mean loss over assistant tokens of held-out conversations (packed, in order, in rows of
    seq_len positions: the model's window unless given)."""
    rows = pack(examples, range(len(examples)), seq_len or model.cfg.max_seq_len, packing=True)
    nats, n = 0.0, 0
    device = next(model.parameters()).device
    with eval_mode(model):
        for i in range(0, len(rows), batch_size):
            x, y, mask, pos, seg = (t.to(device) for t in torch.stack(rows[i : i + batch_size], 1))
            logits = model(x, positions=pos, segments=seg)
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            nats += float((losses * mask.flatten()).sum())
            n += int(mask.sum())
    return {"val_loss": nats / max(n, 1)}


class MixedBatches:
    """(sft batch, pretraining batch) pairs, resumable: for L = L_sft + lambda * L_pt."""

    def __init__(self, sft, pt):
        self.sft, self.pt = sft, pt

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.sft), next(self.pt)

    def state_dict(self):
        return {"sft": self.sft.state_dict(), "pt": self.pt.state_dict()}

    def load_state_dict(self, state):
        self.sft.load_state_dict(state["sft"])
        self.pt.load_state_dict(state["pt"])


def mixed_loss(model: nn.Module, batch, pt_weight: float) -> LossResult:
    ft, pt = lm_loss(model, batch[0]), lm_loss(model, batch[1])
    return LossResult(ft.loss + pt_weight * pt.loss, ft.n)


def sft(cfg: Config, progress: bool = True) -> StageResult:
    """Fine-tune cfg.sft.base_model on the conversations; save OUT/model (+
    OUT/adapters.safetensors)."""
    if not cfg.sft.base_model:
        raise ValueError("no base model: give --sft.base_model=DIR (e.g. runs/speedrun/model)")
    base, tok = Path(cfg.sft.base_model), Tokenizer.load(cfg.sft.base_model)
    begin(cfg)
    train_c, val_c, counts = located_sources(cfg)
    window = read_model_config(base).max_seq_len
    if cfg.sft.max_seq_len < 0:
        raise ValueError(f"sft.max_seq_len must be >= 0 (0: the model's window {window})")
    seq_len = min(cfg.sft.max_seq_len or window, window)
    # bad data, a conversation its template refuses, or bad LoRA targets fail before any write
    train_ex, val_ex = _encode(tok, train_c, val_c, seq_len, counts)
    batches, loss_fn = _batches_and_loss(cfg, base, tok, train_ex, seq_len)
    model, lora = load_trainable(cfg, base)
    open_out(cfg)
    bs = cfg.train.batch_size
    before = sft_eval(cast(LanguageModel, model), val_ex, bs, seq_len) if val_ex else {}
    if before:  # the base model on the same held-out turns: what the fine-tuning is measured by
        log.info("held-out SFT loss (assistant tokens) before training: %.4f", before["val_loss"])
    stage = Stage(
        model,
        batches,
        loss_fn,
        save=partial(save_trainable, model, tok=tok),
        evaluate=partial(sft_eval, examples=val_ex, batch_size=bs, seq_len=seq_len)
        if val_ex
        else None,
        final=partial(sft_eval, examples=val_ex, seq_len=seq_len) if val_ex else None,
        samples=_sampler(tok, [c for _, c in val_c], cfg.seed),
        flops_per_token=account(model)["train_flops_per_token"],
        fingerprint=stage_fingerprint(cfg, tok, ("sft", "lora", "poems")),
        info={"lora": lora, "data": counts, "before": before},
    )
    result = run(cfg, stage, progress)
    after = result.final.get("val_loss")
    log.info(
        "final held-out SFT loss (assistant tokens): %s (before training: %s)",
        after,
        before.get("val_loss"),
    )
    return result


def _encode(tok: Tokenizer, train_c: list, val_c: list, seq_len: int, counts: dict):
    """(train, val) examples of the located conversations, with what the window cut logged."""
    train_ex, stats = encode_conversations(
        tok, [c for _, c in train_c], seq_len, [w for w, _ in train_c]
    )
    val_ex, _ = encode_conversations(tok, [c for _, c in val_c], seq_len, [w for w, _ in val_c])
    log.info(
        "sft data: %s; train %d conversations (%d cut after their last assistant turn that fits "
        "%d tokens, %d skipped: first answer too long), val %d",
        counts,
        len(train_ex),
        stats["truncated"],
        seq_len + 1,
        stats["skipped_too_long"],
        len(val_ex),
    )
    log.info(
        "row fill: packed %.1f%%, one per row %.1f%%",
        100 * fill_rate(train_ex, seq_len, True),
        100 * fill_rate(train_ex, seq_len, False),
    )
    return train_ex, val_ex


def _batches_and_loss(cfg: Config, base: Path, tok: Tokenizer, train_ex: list, seq_len: int):
    """SFT batches and lm_loss, or (sft.pt_weight > 0) mixed with the base model's pretraining
    shards (which must hold its tokenizer's ids)."""
    bs = cfg.train.batch_size
    batches = SFTBatches(
        train_ex, batch_size=bs, seq_len=seq_len, seed=cfg.seed, packing=cfg.sft.packing
    )
    if cfg.sft.pt_weight <= 0:
        return batches, lm_loss
    shards = Path(cfg.sft.pt_shards) if cfg.sft.pt_shards else base.parent / "shards"
    if load_meta(shards).get("tokenizer_sha256", tok.sha256) != tok.sha256:
        raise ValueError(
            f"the pretraining shards {shards} hold another tokenizer's ids than the base model "
            f"{base}: give --sft.pt_shards prepared with its tokenizer (zerolm pretrain --init "
            "prepares them), or --sft.pt_weight=0"
        )
    pt = TokenBatches(shards, "train", batch_size=bs, seq_len=seq_len, seed=cfg.seed)
    return MixedBatches(batches, pt), partial(mixed_loss, pt_weight=cfg.sft.pt_weight)


def _sampler(tok: Tokenizer, val_c: list, seed: int):
    """Replies to the first two held-out conversations' last questions (None: there are none)."""
    samples = [c[:-1] for c in val_c[:2] if c[-1]["role"] == "assistant"]
    req = chat_request(tok, 96, SamplingParams(temperature=0.7, top_k=50), seed=seed)

    def sample_fn(m):
        return [
            f"{c[-1]['content']!r} -> {r!r}" for c, r in zip(samples, replies(m, tok, samples, req))
        ]

    return sample_fn if samples else None
