"""`zerolm classify`: a fine-tuned classifier's predictions for a file, with accuracy when
every row is labelled."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from zerolm.finetune.classify_data import encode, label_ids, read_rows
from zerolm.finetune.classify_model import LABELS_FILE, predict, scores
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load_classifier(model_dir: str | Path):
    """(model, tokenizer, label names) of a finetune-classify output directory."""
    path = Path(model_dir) / LABELS_FILE
    if not path.is_file():
        raise ValueError(
            f"{model_dir} is not a classifier (no {LABELS_FILE}); fine-tune one with "
            "`zerolm finetune-classify --model BERT_DIR`"
        )
    labels = json.loads(path.read_text(encoding="utf-8"))
    model = load_model(model_dir)
    if model.cfg.n_labels != len(labels):
        raise ValueError(
            f"{model_dir}: {LABELS_FILE} names {len(labels)} labels, the model has "
            f"{model.cfg.n_labels}"
        )
    return model, Tokenizer.load(model_dir), labels


def classify_file(
    model_dir: str | Path,
    input: str | Path,
    *,
    text_field: str = "text",
    pair_field: str = "",
    label_field: str = "label",
    truncation: str = "longest_first",
    batch_size: int = 64,
) -> dict:
    """Predictions for every row of `input` (JSONL or .txt); accuracy when every row has a label."""
    model, tok, labels = load_classifier(model_dir)
    rows = read_rows(
        input,
        text_field=text_field,
        pair_field=pair_field,
        label_field=label_field,
        need_label=False,
    )
    enc, cut = encode(tok, rows, model.cfg.max_seq_len, truncation)
    if cut:
        log.warning(
            "%d of %d rows longer than the %d-token window were truncated (longest first, from "
            "the end)",
            cut,
            len(rows),
            model.cfg.max_seq_len,
        )
    probs = predict(model, enc, tok.pad_id, batch_size) if rows else torch.zeros(0, len(labels))
    out = {
        "predictions": [labels[i] for i in probs.argmax(-1).tolist()],
        "probs": probs.max(-1).values.tolist(),
        "rows": len(rows),
        "truncated": cut,
    }
    labelled = [r for r in rows if r.label is not None]
    if labelled:
        if len(labelled) != len(rows):
            raise ValueError(
                f"{input}: {len(labelled)} of {len(rows)} rows have a {label_field!r} field; for "
                "accuracy every row needs one, for predictions alone none"
            )
        out |= scores(probs, label_ids(rows, labels))
    return out
