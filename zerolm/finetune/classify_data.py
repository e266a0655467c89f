"""Classification rows: JSONL/.txt files, the tang-authors builtin, class ids and the
[CLS] text [SEP] (pair [SEP]) encoding."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from functools import partial
from pathlib import Path

import torch

from zerolm.config import Config
from zerolm.data.mlm import BertIds, pad_rows, pair_ids
from zerolm.data.prepare import read_docs
from zerolm.data.sources import decode_lines
from zerolm.data.split import split_by_hash
from zerolm.tokenizer import Tokenizer

NOT_AN_AUTHOR = ("不详", "无名氏", "佚名")  # "unknown", "anonymous": not poets to attribute to


@dataclasses.dataclass(frozen=True)
class Row:
    text: str
    pair: str | None = None
    label: str | None = None
    where: str = ""  # file:line, for error messages


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
    bert_ids, out, cut = BertIds.of(tok), [], 0
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
        out.append(pair_ids(a, b if r.pair is not None else [], bert_ids))
    return out, cut


def collate(
    items: list[tuple[tuple[list[int], list[int]], int]], pad_id: int
) -> tuple[torch.Tensor, ...]:
    """[((ids, segments), class)] -> ids, segments, attention_mask (B, T), labels (B,); ids padded
    with the tokenizer's pad_id."""
    return (*pad_rows([x for x, _ in items], pad_id), torch.tensor([y for _, y in items]))
