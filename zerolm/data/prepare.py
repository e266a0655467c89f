"""`zerolm prepare`: raw text -> cleaned, de-duplicated, split documents -> tokenizer -> token
shards.

Three stages, each written atomically into the run directory and skipped when its inputs are
unchanged (a fingerprint of config, input files and upstream stages is kept in stage.json):

    OUT/docs/{train,val}.jsonl     cleaned documents (+ metadata such as title/author)
    OUT/tokenizer/tokenizer.json   trained (or copied from tokenizer.path: e.g. a model's own)
    OUT/shards/meta.json + *.bin   token ids, memory-mappable
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from zerolm.config import Config, DataConfig, save_config
from zerolm.data.clean import clean_text, filter_reason
from zerolm.data.dedup import NearDedup, content_hash
from zerolm.data.shards import META, ShardWriter, token_dtype, write_meta
from zerolm.data.sources import corpus_path, iter_docs, list_files
from zerolm.data.split import split_key
from zerolm.files import atomic_dir, atomic_write_text, writing_into
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.report import compression_report
from zerolm.tokenizer.train import check_config, train_tokenizer

log = logging.getLogger(__name__)
STAGE = "stage.json"
VERSION = 1  # bump when a stage's output format or semantics change
SPLITS = ("train", "val")


def _fingerprint(*parts) -> str:
    blob = json.dumps([VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _up_to_date(stage_dir: Path, fingerprint: str, name: str = STAGE) -> dict | None:
    path = stage_dir / name
    if path.is_file():
        info = json.loads(path.read_text(encoding="utf-8"))
        if info.get("fingerprint") == fingerprint:
            return info
    return None


def _inputs_fingerprint(cfg: DataConfig) -> str:
    files = [
        (str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in list_files(cfg.inputs)
    ]
    corpora = []
    for name in cfg.corpus:
        with corpus_path(name).open("rb") as f:
            corpora.append((name, hashlib.sha256(f.read()).hexdigest()))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "shard_tokens"}
    return _fingerprint(settings, files, corpora)


def read_docs(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _move_to_val(tmp: Path, line: int, counts: dict) -> None:
    """Move train document number `line` to the (empty) validation split."""
    src, dst = tmp / "train.jsonl", tmp / "train.jsonl.new"
    with (
        open(src, encoding="utf-8") as fin,
        open(dst, "w", encoding="utf-8") as fout,
        open(tmp / "val.jsonl", "w", encoding="utf-8") as fval,
    ):
        for i, row in enumerate(fin):
            (fval if i == line else fout).write(row)
            if i == line:
                text = json.loads(row)["text"]
                for key, n in (
                    ("documents", 1),
                    ("chars", len(text)),
                    ("bytes", len(text.encode("utf-8"))),
                ):
                    counts["train"][key] -= n
                    counts["val"][key] += n
    os.replace(dst, src)


# ---------------------------------------------------------------- stage 1: documents


@dataclasses.dataclass
class _DocCounts:
    """What stage 1 counts while it writes the splits."""

    read: int = 0
    bytes_in: int = 0
    dropped: Counter[str] = dataclasses.field(default_factory=Counter)
    splits: dict[str, dict[str, int]] = dataclasses.field(
        default_factory=lambda: {s: {"documents": 0, "chars": 0, "bytes": 0} for s in SPLITS}
    )
    # the train document with the smallest split key, in case val ends up empty
    lowest: tuple[float, int] = (1.0, -1)


def _drop_reason(
    text: str, cfg: DataConfig, seen: set[bytes], near: NearDedup | None
) -> str | None:
    """Why a cleaned document is dropped (a filter, or a duplicate of an earlier one), else None;
    the exact hash of a document that passes the filters joins `seen`."""
    reason = filter_reason(text, cfg)
    if reason is None and cfg.dedup != "none":
        key = content_hash(text)
        if key in seen:
            return "exact_duplicate"
        seen.add(key)
        if near is not None and near.is_duplicate(text):
            return "near_duplicate"
    return reason


def _write_docs(cfg: DataConfig, tmp: Path, near: NearDedup | None, progress: bool) -> _DocCounts:
    """Clean, filter and de-duplicate the inputs into tmp/{train,val}.jsonl, split by hash."""
    n = _DocCounts()
    seen: set[bytes] = set()
    files = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
    try:
        bar = tqdm(
            iter_docs(cfg),
            desc="prepare docs",
            unit=" doc",
            disable=not progress,
            mininterval=0.5,
        )
        for doc in bar:
            n.read += 1
            n.bytes_in += len(doc.text.encode("utf-8"))
            text = clean_text(doc.text)
            if reason := _drop_reason(text, cfg, seen, near):
                n.dropped[reason] += 1
                continue
            key = split_key(text)
            split = "val" if key < cfg.val_fraction else "train"
            if split == "train" and key < n.lowest[0]:
                n.lowest = (key, n.splits["train"]["documents"])
            files[split].write(json.dumps({"text": text, **doc.meta}, ensure_ascii=False) + "\n")
            c = n.splits[split]
            c["documents"] += 1
            c["chars"] += len(text)
            c["bytes"] += len(text.encode("utf-8"))
    finally:
        for f in files.values():
            f.close()
    return n


def _check_splits(cfg: DataConfig, tmp: Path, n: _DocCounts) -> int:
    """The number of documents kept, after making sure both splits the config asks for have
    documents (moving one to an empty validation split)."""
    counts = n.splits
    kept = sum(c["documents"] for c in counts.values())
    why = ", ".join(f"{k}: {v}" for k, v in sorted(n.dropped.items())) or "none"
    if kept == 0:
        raise ValueError(
            f"empty corpus: {n.read} document(s) read, none kept (dropped: {why}); "
            "check the inputs and the filters (--data.min_chars, --data.min_letter_frac)"
        )
    if cfg.val_fraction > 0 and counts["val"]["documents"] == 0:
        if kept < 2:
            raise ValueError(
                f"only {kept} document kept: nothing left for a validation split. "
                "Split .txt files into more documents (--data.txt_unit=paragraph or line), "
                "add documents, or set --data.val_fraction=0"
            )
        log.warning(
            "no document fell in the %.0f%% validation share; moving one (by lowest hash)",
            100 * cfg.val_fraction,
        )
        _move_to_val(tmp, n.lowest[1], counts)
    if counts["train"]["documents"] == 0:
        raise ValueError(
            f"the training split is empty ({kept} document(s) kept); lower --data.val_fraction"
        )
    return kept


def build_docs(cfg: DataConfig, out: Path, progress: bool = True) -> dict:
    fingerprint = _inputs_fingerprint(cfg)
    if info := _up_to_date(out / "docs", fingerprint):
        log.info("docs: up to date (%s)", out / "docs")
        return info
    near = (
        NearDedup(cfg.num_perm, cfg.near_threshold, cfg.shingle_chars)
        if cfg.dedup == "near"
        else None
    )
    t0 = time.time()
    with atomic_dir(out / "docs") as tmp:
        n = _write_docs(cfg, tmp, near, progress)
        kept = _check_splits(cfg, tmp, n)
        info = {
            "fingerprint": fingerprint,
            "documents_read": n.read,
            "bytes_read": n.bytes_in,
            "documents_kept": kept,
            "dropped": dict(sorted(n.dropped.items())),
            "splits": n.splits,
            "seconds": round(time.time() - t0, 2),
        }
        atomic_write_text(tmp / STAGE, json.dumps(info, indent=2))
    return info


# ---------------------------------------------------------------- stage 2: tokenizer


def build_tokenizer(
    cfg: Config, out: Path, docs_info: dict, progress: bool = True
) -> tuple[Tokenizer, dict]:
    tcfg = cfg.tokenizer
    source = Tokenizer.load(tcfg.path).sha256 if tcfg.path else None
    fingerprint = _fingerprint(dataclasses.asdict(tcfg), source, docs_info["fingerprint"])
    if info := _up_to_date(out / "tokenizer", fingerprint):
        log.info("tokenizer: up to date (%s)", out / "tokenizer")
        return Tokenizer.load(out / "tokenizer"), info
    t0 = time.time()
    if tcfg.path:
        tok = Tokenizer.load(tcfg.path)
    else:
        texts = (d["text"] for d in read_docs(out / "docs" / "train.jsonl"))
        tok = train_tokenizer(
            tcfg, texts, length=docs_info["splits"]["train"]["documents"], progress=progress
        )
    seconds = round(time.time() - t0, 2)
    report = compression_report(tok, (d["text"] for d in read_docs(out / "docs" / "val.jsonl")))
    info = {
        "fingerprint": fingerprint,
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "sha256": tok.sha256,
        "train_seconds": seconds,
        "train_bytes": docs_info["splits"]["train"]["bytes"],
        "compression_val": report,
    }
    with atomic_dir(out / "tokenizer") as tmp:
        tok.save(tmp)
        atomic_write_text(tmp / STAGE, json.dumps(info, indent=2, ensure_ascii=False))
    return tok, info


# ---------------------------------------------------------------- stage 3: shards


def document_start(tok: Tokenizer) -> list[int]:
    """The ids a foreign tokenizer puts before a text (e.g. Llama's bos), so that documents start
    in training as prompts start in generation (Tokenizer.completion_ids); none for zerolm's own,
    whose documents start after the previous one's eos."""
    if not tok.foreign:
        return []
    plain, full = tok.encode("a"), tok.completion_ids(["a"])[0]
    at = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
    return full[:at]


def build_shards(
    cfg: DataConfig, out: Path, tok: Tokenizer, docs_info: dict, progress: bool = True
) -> dict:
    fingerprint = _fingerprint(tok.sha256, docs_info["fingerprint"], cfg.shard_tokens)
    if info := _up_to_date(out / "shards", fingerprint, META):
        log.info("shards: up to date (%s)", out / "shards")
        return info
    dtype = token_dtype(tok.vocab_size)
    lead = document_start(tok)
    splits = {}
    t0 = time.time()
    with atomic_dir(out / "shards") as tmp:
        for split in SPLITS:
            writer = ShardWriter(tmp, split, dtype, tok.eos_id, cfg.shard_tokens)
            total = docs_info["splits"][split]["documents"]
            bar = tqdm(
                total=total, desc=f"shards {split}", unit=" doc", disable=not progress or not total
            )
            texts = (d["text"] for d in read_docs(out / "docs" / f"{split}.jsonl"))
            for _, ids in tok.encode_stream(texts):  # parallel across cores, bounded batches
                writer.add(np.concatenate([lead, ids]) if lead else ids)
                bar.update()
            bar.close()
            files = writer.finish()
            splits[split] = {
                "files": files,
                "documents": sum(f["documents"] for f in files),
                "tokens": sum(f["tokens"] for f in files),
                "bytes": docs_info["splits"][split]["bytes"],
                "chars": docs_info["splits"][split]["chars"],
            }
        info = {
            "fingerprint": fingerprint,
            "version": VERSION,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "tokenizer_sha256": tok.sha256,
            "documents_end_with": "eos",
            **({"documents_start_with": lead} if lead else {}),
            "splits": splits,
            "seconds": round(time.time() - t0, 2),
        }
        write_meta(tmp, info)
    return info


def prepare(
    cfg: Config, stages: tuple[str, ...] = ("docs", "tokenizer", "shards"), progress: bool = True
) -> dict:
    """Run the data stages into cfg.out_dir; returns a summary of every stage."""
    out = Path(cfg.out_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    summary: dict = {"out_dir": str(out)}
    if (
        "tokenizer" in stages or "shards" in stages
    ):  # fail before any work, so a bad run changes nothing
        if cfg.tokenizer.path:
            Tokenizer.load(cfg.tokenizer.path)
        check_config(cfg.tokenizer)
    with writing_into(out / "docs", "the cleaned documents"):
        docs = build_docs(cfg.data, out, progress)
        save_config(cfg, out)
    summary["docs"] = docs
    if "tokenizer" in stages or "shards" in stages:
        with writing_into(out / "tokenizer", "the tokenizer"):
            tok, summary["tokenizer"] = build_tokenizer(cfg, out, docs, progress)
        if "shards" in stages:
            with writing_into(out / "shards", "the token shards"):
                summary["shards"] = build_shards(cfg.data, out, tok, docs, progress)
    return summary
