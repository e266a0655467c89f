"""`zerolm pretrain --model.arch=encdec`: parallel pairs -> a trained encoder-decoder in OUT/model.

Pairs come from zerolm.data.pairs (the bundled Bible, JSONL, or line-aligned files). One tokenizer
is trained on both sides of the training pairs (written as OUT/docs/*.jsonl so the tokenizer stage
of `prepare` is reused, with its fingerprint and compression report). Training is teacher-forced
cross-entropy with label smoothing on the shared Trainer, in batches of pairs of similar length;
the end of the run translates the held-out pairs with beam search and reports BLEU and chrF next
to the copy-the-source baseline.

Legend: B pairs, S source tokens (+ eos), T target tokens (+ the start or end token).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from zerolm.config import Config
from zerolm.data.collate import IGNORE, pad_right
from zerolm.data.loader import Shuffled
from zerolm.data.pairs import load_pairs
from zerolm.data.prepare import _fingerprint, build_tokenizer
from zerolm.dist.group import is_main, main_first
from zerolm.eval.translation import encode_source, evaluate_translation, translate_texts
from zerolm.files import atomic_write_text
from zerolm.model import save_model
from zerolm.model.encdec import EncoderDecoder
from zerolm.tokenizer import Tokenizer
from zerolm.train.fingerprint import stage_fingerprint
from zerolm.train.losses import LossResult, linear_cross_entropy
from zerolm.train.run import Stage, StageResult, begin, new_model, open_out, run

log = logging.getLogger(__name__)


def encode_pairs(
    tok: Tokenizer,
    pairs: list[tuple[str, str]],
    window: int,
    too_long: str = "error",
    split: str = "train",
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(source ids + eos, target ids) per pair; a pair whose source + eos or start + target exceeds
    the window is an error naming it, or is dropped (too_long="drop"). Returns (items, dropped)."""
    src = tok.encode_batch([s for s, _ in pairs], split_special=False)
    tgt = tok.encode_batch([t for _, t in pairs], split_special=False)
    eos, items, dropped = tok.eos_id, [], 0
    for i, (s, t) in enumerate(zip(src, tgt)):
        if len(s) + 1 > window or len(t) + 1 > window:
            if too_long == "error":
                raise ValueError(
                    f"{split} pair {i + 1} ({pairs[i][0][:40]!r}...) is {len(s) + 1} source / "
                    f"{len(t) + 1} target tokens, more than the model window of {window}: raise "
                    "--model.max_seq_len, or drop such pairs with --seq2seq.too_long=drop"
                )
            dropped += 1
            continue
        items.append(([*s, eos], t))
    return items, dropped


def collate(items, *, pad: int, bos: int, eos: int):
    """-> (src (B, S), src_mask (B, S) bool, tgt_in (B, T) = start + target, tgt_out (B, T) =
    target + eos, IGNORE at padding)."""
    src = pad_right([s for s, _ in items], pad)
    tgt_in = pad_right([[bos, *t] for _, t in items], pad)
    tgt_out = pad_right([[*t, eos] for _, t in items], IGNORE)
    return src, src != pad, tgt_in, tgt_out


def seq2seq_loss(model: EncoderDecoder, batch, label_smoothing: float = 0.0) -> LossResult:
    """Teacher-forced cross-entropy (with label smoothing) over the real target tokens."""
    device = next(model.parameters()).device
    src, src_mask, tgt_in, tgt_out = (t.to(device) for t in batch)
    hidden = model.decode(tgt_in, model.encode(src, src_mask), src_mask)  # (B, T, D)
    loss = linear_cross_entropy(
        hidden,
        model.head_weight,
        model.final_logits_bias,
        tgt_out,
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )  # no (B, T, V) logits kept
    return LossResult(loss, (tgt_out != IGNORE).sum())


@torch.no_grad()
def evaluate_pairs(
    model: EncoderDecoder,
    items,
    *,
    pad: int,
    bos: int,
    eos: int,
    batch_size: int,
    max_batches: int = 0,
) -> dict:
    """Token-weighted cross-entropy (no smoothing) and perplexity of the target tokens."""
    nats, n = 0.0, 0
    starts = range(0, len(items), batch_size)
    for k, start in enumerate(starts):
        if max_batches and k >= max_batches:
            break
        src, src_mask, tgt_in, tgt_out = collate(
            items[start : start + batch_size], pad=pad, bos=bos, eos=eos
        )
        logits = model(src, tgt_in, src_mask)
        nats += F.cross_entropy(
            logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        n += int((tgt_out != IGNORE).sum())
    mean = nats / max(n, 1)
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}


def _write_docs(out: Path, pairs: dict, fingerprint: str) -> dict:
    """Both sides of the pairs as documents, so prepare's tokenizer stage trains on them."""
    docs = out / "docs"
    splits = {}
    for split, rows in pairs.items():
        texts = [t for pair in rows for t in pair]
        atomic_write_text(
            docs / f"{split}.jsonl",
            "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
        )
        splits[split] = {
            "documents": len(texts),
            "bytes": sum(len(t.encode("utf-8")) for t in texts),
        }
    return {"fingerprint": fingerprint, "splits": splits}


def pretrain_seq2seq(cfg: Config, progress: bool = True) -> StageResult:
    early = stage_fingerprint(cfg, None, ("seq2seq", "tokenizer"))
    out = begin(cfg, early)  # before the docs and tokenizer of changed pairs are rebuilt
    pairs, info = load_pairs(cfg.seq2seq)
    log.info(
        "pairs: %d train, %d held out (%s)",
        info["train"],
        info["val"],
        "; ".join(f"{k}: {v['train']}/{v['val']}" for k, v in info["sources"].items()),
    )
    open_out(cfg)
    with main_first():  # under torchrun: rank 0 writes, the others find it written
        docs_info = _write_docs(out, pairs, _fingerprint(dataclasses.asdict(cfg.seq2seq), info))
        tok, _ = build_tokenizer(cfg, out, docs_info, progress=progress and is_main())
    model = new_model(cfg, dataclasses.replace(cfg.model, arch="encdec"), tok.vocab_size)
    assert isinstance(model, EncoderDecoder)
    log.info(
        "model: encdec (%s blocks), %.2f M parameters (d_model=%d, %d+%d layers, window %d)",
        model.cfg.preset,
        sum(p.numel() for p in model.parameters()) / 1e6,
        model.cfg.d_model,
        model.cfg.n_layers,
        model.cfg.n_decoder_layers,
        model.cfg.max_seq_len,
    )
    enc = _encode_splits(tok, pairs, model.cfg.max_seq_len, cfg.seq2seq.too_long)
    ids: dict[str, Any] = dict(pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id)
    held, bs = enc["val"], cfg.train.batch_size
    shown = random.Random(cfg.seed).sample(pairs["val"], min(2, len(pairs["val"])))

    def sample_fn(m):
        hyps = translate_texts(m, tok, [s for s, _ in shown], beam=1)
        return [f"{s}\n-> {h}" for (s, _), h in zip(shown, hyps)]

    stage = Stage(
        model,
        Shuffled(
            enc["train"],
            bs,
            cfg.seed,
            collate=partial(collate, **ids),
            length=lambda item: len(item[0]) + len(item[1]),
        ),
        partial(seq2seq_loss, label_smoothing=cfg.seq2seq.label_smoothing),
        save=partial(save_model, model, tokenizer=tok),
        evaluate=partial(
            evaluate_pairs, items=held, batch_size=bs, max_batches=cfg.train.eval_batches, **ids
        )
        if held
        else None,
        final=partial(
            _final_eval, cfg=cfg, tok=tok, val=pairs["val"], held=held, ids=ids, progress=progress
        )
        if held
        else None,
        samples=sample_fn if shown else None,
        flops_per_token=_flops_per_target_token(model, enc["train"]),
        fingerprint={**early, "tokenizer.sha256": tok.sha256, "data.pairs": str(info)},
        info={"pairs": info},
    )
    return run(cfg, stage, progress)


def _encode_splits(tok: Tokenizer, pairs: dict, window: int, too_long: str) -> dict:
    enc = {}
    for split in ("train", "val"):
        enc[split], dropped = encode_pairs(tok, pairs[split], window, too_long, split)
        if dropped:
            log.warning(
                "%s: dropped %d pairs longer than the window of %d tokens", split, dropped, window
            )
    return enc


def _flops_per_target_token(model: EncoderDecoder, train: list) -> float:
    """Training FLOPs per target token: 6 x the matrices each token passes through, the encoder's
    counted once per source token (sources are about as long as targets here: their ratio is
    used)."""
    src_per_tgt = sum(len(s) for s, _ in train) / max(1, sum(len(t) + 1 for _, t in train))

    def matrices(prefix: str) -> int:
        return sum(
            p.numel() for n, p in model.named_parameters() if n.startswith(prefix) and p.dim() >= 2
        )

    cfg = model.cfg
    return 6 * (
        matrices("decoder") + cfg.d_model * cfg.vocab_size + src_per_tgt * matrices("encoder")
    )


def _final_eval(
    model: EncoderDecoder,
    *,
    cfg: Config,
    tok: Tokenizer,
    val: list,
    held: list,
    ids: dict,
    progress: bool,
) -> dict:
    """The held-out loss over all pairs, then BLEU / chrF of beam-search translations (written
    to OUT/eval/) next to the copy-the-source baseline."""
    s2s, out = cfg.seq2seq, Path(cfg.out_dir)
    final = evaluate_pairs(model, held, batch_size=cfg.train.batch_size, **ids)
    chosen = list(val)
    if s2s.eval_pairs:
        chosen = random.Random(cfg.seed).sample(chosen, min(s2s.eval_pairs, len(chosen)))
    sources, refs = [s for s, _ in chosen], [t for _, t in chosen]
    log.info("translating %d held-out pairs (beam %d) for BLEU / chrF", len(chosen), s2s.beam)
    scores = evaluate_translation(
        model,
        tok,
        sources,
        refs,
        beam=s2s.beam,
        length_penalty=s2s.length_penalty,
        progress=progress,
        too_long="truncate",
    )
    hyps = scores.pop("translations")
    for name, lines in (("source", sources), ("reference", refs), ("translation", hyps)):
        atomic_write_text(out / "eval" / f"{name}.txt", "".join(line + "\n" for line in lines))
    atomic_write_text(out / "eval" / "scores.json", json.dumps(scores, indent=2))
    log.info(
        "held-out (%d pairs): BLEU %.2f chrF %.2f | copy-the-source BLEU %.2f chrF %.2f | val "
        "loss %.4f",
        scores["pairs"],
        scores["bleu"],
        scores["chrf"],
        scores["copy_bleu"],
        scores["copy_chrf"],
        final["val_loss"],
    )
    return {**final, **scores}


__all__ = [
    "collate",
    "encode_pairs",
    "encode_source",
    "evaluate_pairs",
    "pretrain_seq2seq",
    "seq2seq_loss",
]
