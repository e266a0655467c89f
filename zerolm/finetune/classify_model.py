"""The classifier: a pretrained bert with a fresh head on the pooled [CLS], its loss,
predictions and held-out scores.

Legend: B rows, T tokens, C classes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from zerolm.data.mlm import pad_rows
from zerolm.eval.mode import eval_mode
from zerolm.model import build_model, model_class, read_model_config
from zerolm.model.bert import Bert
from zerolm.model.presets import resolve
from zerolm.train.losses import LossResult

log = logging.getLogger(__name__)


LABELS_FILE = "labels.json"


def bert_config(base: Path):
    """The model config of `base`, which must be a bert model."""
    cfg = read_model_config(base)
    if cfg.arch != "bert":
        raise ValueError(
            f"{base} is a {cfg.arch} model: finetune-classify needs a bert encoder (pretrain one "
            "with `zerolm pretrain --model.arch=bert`, e.g. --config recipes/bert-tang.toml)"
        )
    return cfg


def classifier_from(base: Path, n_labels: int, seed: int = 0):
    """The pretrained bert of `base` with a freshly initialised n_labels-way head (its pooler and
    encoder keep their weights; an existing head of another size is replaced)."""
    cfg = dataclasses.replace(bert_config(base), n_labels=n_labels)
    model = build_model(cfg, seed=seed)
    with torch.device("meta"):
        body = set(model_class(cfg)(resolve(dataclasses.replace(cfg, n_labels=0))).state_dict())
    state = load_file(str(base / "model.safetensors"))
    missing = sorted(body - set(state))
    if missing:
        raise ValueError(
            f"{base}/model.safetensors lacks {missing[:4]}: not the weights of its config.json"
        )
    model.load_state_dict({k: state[k] for k in body}, strict=False)
    log.info(
        "classifier: %s + a fresh %d-way head (%s)",
        base,
        n_labels,
        ", ".join(sorted(set(model.state_dict()) - body)),
    )
    return model


def classify_loss(model: Bert, batch) -> LossResult:
    """Cross entropy of the pooled-[CLS] head; counted: the rows; stats: acc."""
    device = next(model.parameters()).device
    ids, seg, att, y = (t.to(device) for t in batch)
    logits = model.classify_logits(model.hidden(ids, seg, att)).float()  # (B, C)
    acc = (logits.argmax(-1) == y).float().mean()
    return LossResult(F.cross_entropy(logits, y), len(y), {"acc": acc})


@torch.no_grad()
def predict(model: Bert, encoded: list, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """(N, C) class probabilities of encoded rows (padded with the tokenizer's pad_id), batched
    by length (little padding), in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    probs = torch.zeros(len(encoded), model.cfg.n_labels)
    with eval_mode(model):
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            ids, seg, att = (t.to(device) for t in pad_rows([encoded[j] for j in idx], pad_id))
            logits = model.classify_logits(model.hidden(ids, seg, att))
            probs[idx] = logits.float().softmax(-1).cpu()
    return probs


def scores(probs: torch.Tensor, y: list[int]) -> dict:
    """Accuracy, macro-F1 (mean over the classes present) and loss."""
    target, pred = torch.tensor(y), probs.argmax(-1)
    f1s = []
    for c in target.unique().tolist():
        tp = float(((pred == c) & (target == c)).sum())
        denom = float((pred == c).sum() + (target == c).sum())
        f1s.append(2 * tp / denom if denom else 0.0)
    return {
        "val_acc": float((pred == target).float().mean()),
        "val_macro_f1": sum(f1s) / len(f1s),
        "val_loss": float(F.nll_loss(probs.clamp(min=1e-12).log(), target)),
    }


def evaluate(model: Bert, encoded: list, y: list[int], pad_id: int, batch_size: int = 64) -> dict:
    return scores(predict(model, encoded, pad_id, batch_size), y)
