"""`zerolm sft`: a base model + conversations -> a chat model in OUT/model (full or LoRA).

A stage on the one Trainer: its own batches (packed conversations, loss on assistant tokens
only) and loss (optionally + lambda * the pretraining loss on the base model's shards).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zerolm.config import Config, save_config
from zerolm.data.sft import SFTBatches, encode_conversations, fill_rate, pack, read_conversations
from zerolm.data.split import split_key
from zerolm.infer.chat import chat_request, replies
from zerolm.infer.sampling import SamplingParams
from zerolm.inspect.accounting import account
from zerolm.model import load_model, save_model
from zerolm.tasks import TASKS
from zerolm.tokenizer import Tokenizer
from zerolm.train.checkpoint import list_checkpoints
from zerolm.train.fingerprint import stage_fingerprint
from zerolm.train.losses import lm_loss
from zerolm.train.trainer import Trainer

log = logging.getLogger(__name__)

BUILTIN = ("poems", "chitchat", "chatterbot-en", "chatterbot-zh")


def _split(conversations, val_fraction: float) -> tuple[list, list]:
    """By a hash of the conversation: deterministic and independent of order."""
    train, val = [], []
    for c in conversations:
        (val if split_key(json.dumps(c, ensure_ascii=False)) < val_fraction else train).append(c)
    return train, val


def _cap(items: list, n: int, seed: int) -> list:
    if not n or len(items) <= n:
        return items
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in keep]


def load_sources(cfg: Config) -> tuple[list, list, dict]:
    """(train, val) conversations from the data files and builtin sets, and counts per source."""
    s = cfg.sft
    train, val, counts = [], [], {}
    sources = [(str(f), None) for f in s.data] + [(name, name) for name in s.builtin]
    if not sources:
        raise ValueError(
            "no SFT data: give --sft.data=FILE.jsonl and/or --sft.builtin=poems,chitchat,..."
        )
    for label, builtin in sources:
        if builtin is None:
            tr, va = _split(read_conversations(label), s.val_fraction)
        elif builtin in TASKS:
            tr, va = TASKS[builtin].sft_conversations(cfg)
        elif builtin in BUILTIN:
            from zerolm.data.chat_corpora import read_chat_corpus

            tr, va = _split([row["messages"] for row in read_chat_corpus(builtin)], s.val_fraction)
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


@torch.no_grad()
def sft_eval(model, examples, batch_size: int = 16) -> dict:
    """Mean loss over assistant tokens of held-out conversations (packed, in order)."""
    was_training = model.training
    model.eval()
    rows = pack(examples, range(len(examples)), model.cfg.max_seq_len, packing=True)
    nats, n = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        x, y, mask, pos, seg = (t.to(device) for t in torch.stack(rows[i : i + batch_size], 1))
        logits = model(x, positions=pos, segments=seg)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nats += float((losses * mask.flatten()).sum())
        n += int(mask.sum())
    model.train(was_training)
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


def mixed_loss(model, batch, pt_weight: float):
    (ft, n), (pt, _) = lm_loss(model, batch[0]), lm_loss(model, batch[1])
    return ft + pt_weight * pt, n


def sft(cfg: Config, progress: bool = True) -> dict:
    """Fine-tune cfg.sft.base_model on the conversations; save OUT/model (+ OUT/adapters.safetensors)."""
    if not cfg.sft.base_model:
        raise ValueError("no base model: give --sft.base_model=DIR (e.g. runs/speedrun/model)")
    out, base = Path(cfg.out_dir), Path(cfg.sft.base_model)
    model, tok = load_model(base), Tokenizer.load(base)
    if list_checkpoints(out) and not cfg.train.resume:
        raise ValueError(
            f"{out} already holds checkpoints: continue with --train.resume=true, or use a new --out"
        )
    train_c, val_c, counts = load_sources(
        cfg
    )  # bad data or LoRA targets fail here, before anything is written
    lora = None
    if cfg.lora.rank:
        from zerolm.transforms.lora import apply_lora, trainable_report

        apply_lora(model, cfg.lora, seed=cfg.seed)
        lora = trainable_report(model)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seq_len = model.cfg.max_seq_len
    train_ex, stats = encode_conversations(tok, train_c, seq_len)
    val_ex, _ = encode_conversations(tok, val_c, seq_len)
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
    if lora:
        log.info("LoRA: %s", json.dumps(lora))
    batches = SFTBatches(
        train_ex,
        batch_size=cfg.train.batch_size,
        seq_len=seq_len,
        seed=cfg.seed,
        packing=cfg.sft.packing,
    )
    loss_fn = lm_loss
    if cfg.sft.pt_weight > 0:
        from zerolm.data.loader import TokenBatches

        shards = Path(cfg.sft.pt_shards) if cfg.sft.pt_shards else base.parent / "shards"
        batches = MixedBatches(
            batches,
            TokenBatches(
                shards, "train", batch_size=cfg.train.batch_size, seq_len=seq_len, seed=cfg.seed
            ),
        )
        loss_fn = partial(mixed_loss, pt_weight=cfg.sft.pt_weight)
    eval_fn = (
        partial(sft_eval, examples=val_ex, batch_size=cfg.train.batch_size) if val_ex else None
    )
    samples = [c[:-1] for c in val_c[:2] if c[-1]["role"] == "assistant"]
    req = chat_request(tok, 96, SamplingParams(temperature=0.7, top_k=50), seed=cfg.seed)

    def sample_fn(m):
        return [
            f"{c[-1]['content']!r} -> {r!r}" for c, r in zip(samples, replies(m, tok, samples, req))
        ]

    trainer = Trainer(
        model,
        cfg.train,
        out,
        batches=batches,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        sample_fn=sample_fn if samples else None,
        flops_per_token=account(model)["train_flops_per_token"],
        progress=progress,
        fingerprint=stage_fingerprint(cfg, tok, ("sft", "lora", "poems")),
    )
    row = trainer.fit()
    final = sft_eval(model, val_ex) if val_ex else {}
    if lora:
        from zerolm.transforms.lora import merge_lora, save_adapters

        save_adapters(model, out / "adapters.safetensors")
        merge_lora(model)
    save_model(model, out / "model", tok)
    log.info("final held-out SFT loss (assistant tokens): %s", final.get("val_loss"))
    return {
        **row,
        **{f"final_{k}": v for k, v in final.items()},
        "model_dir": str(out / "model"),
        "lora": lora,
        "data": counts,
    }
