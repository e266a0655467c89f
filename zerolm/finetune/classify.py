"""Sequence classification with a pretrained bert: `zerolm finetune-classify` (train) and
`zerolm classify` (predict).

The classifier is the pretrained encoder + a fresh linear head on the pooled [CLS]
(`Bert.classify_logits`), trained with cross entropy on the one Trainer. Its model directory is a
bert model directory with `n_labels` in config.json plus `labels.json` (the label names, in class
id order). Inputs are `[CLS] text [SEP]`, or `[CLS] text [SEP] pair [SEP]` for sentence pairs;
one longer than the window is cut longest-first (the longer text loses tokens from its end,
starts kept) with a count in the log, or refused with `classify.truncation=error`.

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
import torch.nn.functional as F
from safetensors.torch import load_file

from zerolm.config import Config
from zerolm.data.mlm import LengthBatches, pad_rows, pair_ids
from zerolm.data.prepare import read_docs
from zerolm.data.sources import decode_lines
from zerolm.data.split import split_by_hash
from zerolm.eval.baselines import bag_of_chars_baseline, majority_baseline
from zerolm.eval.mode import eval_mode
from zerolm.files import atomic_write_text
from zerolm.model import build_model, load_model, model_class, read_model_config, save_model
from zerolm.model.bert import Bert
from zerolm.model.presets import resolve
from zerolm.tokenizer import Tokenizer
from zerolm.train.fingerprint import stage_fingerprint
from zerolm.train.losses import LossResult
from zerolm.train.run import Stage, StageResult, begin, open_out, run

log = logging.getLogger(__name__)
LABELS_FILE = "labels.json"
NOT_AN_AUTHOR = ("不详", "无名氏", "佚名")  # "unknown", "anonymous": not poets to attribute to


@dataclasses.dataclass(frozen=True)
class Row:
    text: str
    pair: str | None = None
    label: str | None = None
    where: str = ""  # file:line, for error messages


# ---------------------------------------------------------------- data
def read_rows(
    path: str | Path,
    *,
    text_field: str = "text",
    pair_field: str = "",
    label_field: str = "label",
    need_label: bool = True,
) -> list[Row]:
    """Rows of a JSONL file (or a .txt file: one text per line, no labels). Errors name file and
    line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"classification data {str(path)!r} not found (JSONL rows with {text_field!r} and "
            f"{label_field!r} fields, or a .txt file with one text per line)"
        )
    rows = []
    for i, _, line in decode_lines(path):
        where = f"{path}:{i}"
        if not line.strip():
            continue
        if path.suffix == ".txt":
            if need_label:
                raise ValueError(
                    f"{path}: a .txt file has no labels; training data is JSONL with "
                    f"{text_field!r} and {label_field!r} fields"
                )
            rows.append(Row(line.rstrip("\r\n"), where=where))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{where}: no text field {text_field!r} (set --classify.text_field)")
        pair = obj.get(pair_field) if pair_field else None
        if pair_field and not isinstance(pair, str):
            raise ValueError(
                f"{where}: no second text field {pair_field!r} (classify.text_pair_field)"
            )
        label = obj.get(label_field)
        if label is None and need_label:
            raise ValueError(
                f"{where}: no label field {label_field!r}: every training row needs a label "
                "(set --classify.label_field if it has another name)"
            )
        rows.append(Row(text, pair, None if label is None else str(label), where))
    return rows


def tang_authors(docs: Path, n: int) -> tuple[list[Row], list[Row], dict]:
    """Poems of the n poets with the most poems in the training split, labelled by author;
    train / val follow the prepared docs' own split (by a hash of each poem)."""
    for split in ("train", "val"):
        if not (docs / f"{split}.jsonl").is_file():
            raise ValueError(
                f"tang-authors needs prepared Tang documents: {docs}/{split}.jsonl not found; set "
                "--classify.docs=RUN/docs (a run prepared with --corpus tang)"
            )
    counts = Counter(d.get("author") for d in read_docs(docs / "train.jsonl"))
    top = [
        a for a, _ in counts.most_common(n + len(NOT_AN_AUTHOR) + 1) if a and a not in NOT_AN_AUTHOR
    ][:n]
    if len(top) < 2:
        raise ValueError(
            f"{docs}: documents carry no 'author' metadata; tang-authors needs the bundled tang "
            "corpus"
        )
    keep = set(top)
    out = [
        [
            Row(d["text"], None, d["author"], f"{docs}/{s}.jsonl")
            for d in read_docs(docs / f"{s}.jsonl")
            if d.get("author") in keep
        ]
        for s in ("train", "val")
    ]
    return out[0], out[1], {"authors": top}


def load_rows(cfg: Config) -> tuple[list[Row], list[Row], dict]:
    """(train rows, held-out rows, where they came from) for classify.builtin or classify.data."""
    c = cfg.classify
    read = partial(
        read_rows, text_field=c.text_field, pair_field=c.text_pair_field, label_field=c.label_field
    )
    if c.builtin and c.data:
        raise ValueError("give either --classify.builtin or --classify.data, not both")
    if c.builtin == "tang-authors":
        docs = Path(c.docs) if c.docs else Path(c.base_model).parent / "docs"
        return tang_authors(docs, c.authors)
    if not c.data:
        raise ValueError(
            "no classification data: give --classify.data=FILE.jsonl (rows with text and label) "
            "or --classify.builtin=tang-authors"
        )
    rows = [r for p in c.data for r in read(p)]
    if c.val_data:
        return (
            rows,
            [r for p in c.val_data for r in read(p)],
            {"files": list(c.data)},
        )
    train, val = split_by_hash(
        rows, lambda r: json.dumps([r.text, r.pair], ensure_ascii=False), c.val_fraction
    )
    return (
        train,
        val,
        {"files": list(c.data), "split": f"by a hash of the text, {c.val_fraction:.0%} held out"},
    )


def label_ids(rows: list[Row], labels: list[str]) -> list[int]:
    """Class ids of labelled rows; a label the model was not trained on is an error naming it."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for r in rows:
        if r.label not in index:
            raise ValueError(
                f"{r.where}: label {r.label!r} was never seen in training; known labels: "
                f"{', '.join(labels)}"
            )
        out.append(index[r.label])
    return out


def encode(
    tok: Tokenizer, rows: list[Row], window: int, truncation: str = "longest_first"
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """([CLS] text [SEP] (pair [SEP]) ids and segment ids per row, number of rows truncated)."""
    texts = tok.encode_batch([r.text for r in rows], split_special=False)
    pairs = tok.encode_batch([r.pair or "" for r in rows], split_special=False)
    out, cut = [], 0
    for r, a, b in zip(rows, texts, pairs):
        room = window - (3 if r.pair is not None else 2)
        if len(a) + len(b) > room:
            if truncation == "error":
                raise ValueError(
                    f"{r.where}: {len(a) + len(b) + window - room} tokens with [CLS]/[SEP] exceed "
                    f"the {window}-token window; shorten it, or set "
                    "--classify.truncation=longest_first"
                )
            cut += 1
            while len(a) + len(b) > room:  # longest first, from the end
                a, b = (a[:-1], b) if len(a) >= len(b) else (a, b[:-1])
        out.append(pair_ids(a, b) if r.pair is not None else pair_ids(a, []))
    return out, cut


def collate(items: list[tuple[tuple[list[int], list[int]], int]]) -> tuple[torch.Tensor, ...]:
    """[((ids, segments), class)] -> ids, segments, attention_mask (B, T), labels (B,)."""
    return (*pad_rows([x for x, _ in items]), torch.tensor([y for _, y in items]))


# ---------------------------------------------------------------- model, loss, evaluation
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
def predict(model: Bert, encoded: list, batch_size: int = 64) -> torch.Tensor:
    """(N, C) class probabilities, rows batched by length (little padding), in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    probs = torch.zeros(len(encoded), model.cfg.n_labels)
    with eval_mode(model):
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            ids, seg, att = (t.to(device) for t in pad_rows([encoded[j] for j in idx]))
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


def evaluate(model: Bert, encoded: list, y: list[int], batch_size: int = 64) -> dict:
    return scores(predict(model, encoded, batch_size), y)


# ---------------------------------------------------------------- the stages
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
        list(zip(d.train_x, d.train_y)), lengths, cfg.train.batch_size, cfg.seed, collate=collate
    )
    evaluate_fn = partial(evaluate, encoded=d.val_x, y=d.val_y) if d.val_y else None
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
    on the pooled [CLS] (pooler + head trained)."""
    if freeze == "embeddings":
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(("tok_emb.", "pos_emb.", "seg_emb.", "emb_norm.")))
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
    probs = predict(model, enc, batch_size) if rows else torch.zeros(0, len(labels))
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
