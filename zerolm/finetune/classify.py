"""Sequence classification with a pretrained bert: `zerolm finetune-classify` (train) and
`zerolm classify` (predict).

The classifier is the pretrained encoder + a fresh linear head on the pooled [CLS]
(`Bert.classify_logits`), trained with cross entropy on the one Trainer. Its model directory is a
bert model directory with `n_labels` in config.json plus `labels.json` (the label names, in class
id order). Inputs are `[CLS] text [SEP]`, or `[CLS] text [SEP] pair [SEP]` for sentence pairs;
one longer than the window is cut longest-first (the longer text loses tokens from its end,
starts kept) with a count in the log, or refused with `classify.truncation=error`.

The rows and their encoding are in classify_data.py, the model head, loss and scores in
classify_model.py, `zerolm classify` in classify_predict.py.

Legend: B rows, T tokens, D d_model, C classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch

from zerolm.config import Config
from zerolm.data.mlm_batches import LengthBatches
from zerolm.eval.baselines import bag_of_chars_baseline, majority_baseline
from zerolm.files import atomic_write_text
from zerolm.finetune.classify_data import Row, collate, encode, label_ids, load_rows
from zerolm.finetune.classify_model import (
    LABELS_FILE,
    bert_config,
    classifier_from,
    classify_loss,
    evaluate,
)
from zerolm.model import save_model
from zerolm.model.bert import Bert
from zerolm.tokenizer import Tokenizer
from zerolm.train.fingerprint import stage_fingerprint
from zerolm.train.run import Stage, StageResult, begin, open_out, run

log = logging.getLogger(__name__)


def finetune_classify(cfg: Config, progress: bool = True) -> StageResult:
    """`zerolm finetune-classify`: fine-tune classify.base_model on labelled texts; OUT/model +
    labels.json; the result's info holds the held-out figures' baselines (majority class,
    bag-of-characters) and the data summary, also written to OUT/results.json."""
    c = cfg.classify
    if not c.base_model:
        raise ValueError(
            "no base model: give --model DIR (config key classify.base_model), a bert model "
            "directory"
        )
    base = Path(c.base_model)
    mcfg = bert_config(base)
    out = begin(cfg)
    d = _Data.load(cfg, base, mcfg.max_seq_len)
    if c.epochs:
        per_step = cfg.train.batch_size * cfg.train.grad_accum
        steps = max(1, math.ceil(c.epochs * len(d.train_x) / per_step))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    open_out(cfg)
    info = _baselines(c, d.train_rows, d.val_rows, d.train_y, d.val_y, d.labels)
    torch.manual_seed(cfg.seed)  # dropout masks: the same run twice gives the same classifier
    model = _frozen(classifier_from(base, len(d.labels), seed=cfg.seed), c.freeze)
    t0 = time.perf_counter()
    lengths = [len(x[0]) for x in d.train_x]
    batches = LengthBatches(
        list(zip(d.train_x, d.train_y)),
        lengths,
        cfg.train.batch_size,
        cfg.seed,
        collate=partial(collate, pad_id=d.tok.pad_id),
    )
    evaluate_fn = (
        partial(evaluate, encoded=d.val_x, y=d.val_y, pad_id=d.tok.pad_id) if d.val_y else None
    )
    stage = Stage(
        model,
        batches,
        classify_loss,
        save=partial(_save, model, tok=d.tok, labels=d.labels),
        evaluate=evaluate_fn,
        final=evaluate_fn,
        fingerprint=stage_fingerprint(cfg, d.tok, ("classify",)),
        info=info,
    )
    result = run(cfg, stage, progress)
    info |= {"finetune_seconds": time.perf_counter() - t0, "steps": cfg.train.steps, **d.summary}
    _write_results(out, result)
    return result


@dataclasses.dataclass
class _Data:
    """The rows of a fine-tune, their class ids and their encoding for the model's window."""

    tok: Tokenizer
    labels: list[str]
    train_rows: list[Row]
    val_rows: list[Row]
    train_x: list
    val_x: list
    train_y: list[int]
    val_y: list[int]
    summary: dict

    @classmethod
    def load(cls, cfg: Config, base: Path, max_seq_len: int) -> _Data:
        c = cfg.classify
        train_rows, val_rows, source = load_rows(cfg)
        # every training row has a label (read_rows needs one)
        counts = Counter(r.label for r in train_rows if r.label is not None)
        labels = sorted(counts, key=lambda k: (-counts[k], k))  # most frequent first
        if len(labels) < 2:
            raise ValueError(
                f"{len(train_rows)} training rows carry {len(labels)} distinct label(s); a "
                "classifier needs >= 2"
            )
        train_y, val_y = label_ids(train_rows, labels), label_ids(val_rows, labels)
        tok = Tokenizer.load(base)
        window = min(c.max_seq_len or max_seq_len, max_seq_len)
        (train_x, cut_t), (val_x, cut_v) = (
            encode(tok, rows, window, c.truncation) for rows in (train_rows, val_rows)
        )
        summary = {
            **source,
            "labels": len(labels),
            "train_rows": len(train_rows),
            "val_rows": len(val_rows),
            "train_per_label": {k: counts[k] for k in labels},
            "truncated": {"train": cut_t, "val": cut_v},
            "window": window,
        }
        log.info("classification data: %s", json.dumps(summary, ensure_ascii=False))
        return cls(tok, labels, train_rows, val_rows, train_x, val_x, train_y, val_y, summary)


def _write_results(out: Path, result: StageResult) -> None:
    """OUT/results.json: the baselines, the final held-out figures, the data summary, the last
    row."""
    baseline = ("majority_", "boc_")
    results = {
        **{k: v for k, v in result.info.items() if k.startswith(baseline)},
        **{f"final_{k}": v for k, v in result.final.items()},
        **{k: v for k, v in result.info.items() if not k.startswith(baseline)},
        "model_dir": result.model_dir,
        "last_row": result.last,
    }
    atomic_write_text(out / "results.json", json.dumps(results, ensure_ascii=False, indent=1))


def _save(model: Bert, model_dir: Path, *, tok: Tokenizer, labels: list[str]) -> None:
    save_model(model, model_dir, tok)
    atomic_write_text(model_dir / LABELS_FILE, json.dumps(labels, ensure_ascii=False, indent=1))


def _frozen(model: Bert, freeze: str):
    """classify.freeze: "embeddings" trains all but the embeddings; "encoder" is a linear probe
    on the pooled [CLS] (pooler + head trained). The pretraining heads (mlm, nsp), which the
    classifier never runs, are frozen either way (DDP needs every trained parameter used)."""
    for name, p in model.named_parameters():
        if name.startswith(("mlm.", "nsp.")):
            p.requires_grad_(False)
    if freeze == "embeddings":
        for name, p in model.named_parameters():
            if name.startswith(("tok_emb.", "pos_emb.", "seg_emb.", "emb_norm.")):
                p.requires_grad_(False)
    elif freeze == "encoder":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("classifier.", "pooler.")))
    return model


def _baselines(
    c, train_rows: list, val_rows: list, train_y: list, val_y: list, labels: list
) -> dict:
    """The held-out accuracy of the majority class and (classify.baselines) of a bag-of-characters
    logistic regression: what the fine-tuned classifier has to beat."""
    results: dict = {"majority_acc": None, "boc_lr_acc": None}
    if not val_y:
        log.warning(
            "no held-out rows: nothing to measure accuracy on (set classify.val_data or "
            "classify.val_fraction)"
        )
        return results
    results["majority_acc"] = majority_baseline(train_y, val_y)["accuracy"]
    if c.baselines:
        t0 = time.perf_counter()
        join = [
            r.text if r.pair is None else f"{r.text}\n{r.pair}" for r in (*train_rows, *val_rows)
        ]
        boc = bag_of_chars_baseline(
            join[: len(train_rows)], train_y, join[len(train_rows) :], val_y, len(labels)
        )
        results |= {
            "boc_lr_acc": boc["accuracy"],
            "boc_lr_l2": boc["l2"],
            "boc_lr_seconds": time.perf_counter() - t0,
        }
    log.info(
        "baselines on %d held-out rows: majority class (%s) %.1f%%%s",
        len(val_y),
        labels[0],
        100 * results["majority_acc"],
        f", bag-of-characters logistic regression {100 * results['boc_lr_acc']:.1f}%"
        if c.baselines
        else "",
    )
    return results
