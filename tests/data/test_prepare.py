import json
import os
import random

import numpy as np
import pytest

from zerolm.config import load_config
from zerolm.data.prepare import prepare, read_docs
from zerolm.data.shards import load_meta, open_split
from zerolm.data.split import split_key
from zerolm.tokenizer import Tokenizer

_rng = random.Random(0)
_WORDS = [
    "".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(2, 8)))
    for _ in range(400)
]
DOCS = [f"Document {i}: " + " ".join(_rng.choice(_WORDS) for _ in range(40)) for i in range(60)]
ZH = [
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
]


def cfg_for(out, inputs, **over):
    data = {"inputs": [str(p) for p in inputs], "val_fraction": 0.2}
    data.update(over.pop("data", {}))
    tok = {"vocab_size": 400, "min_frequency": 1, **over.pop("tokenizer", {})}
    return load_config(None, {"out_dir": str(out), "data": data, "tokenizer": tok, **over})


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    with open(src / "a.jsonl", "w", encoding="utf-8") as f:
        for d in DOCS[:30]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
        f.write(json.dumps({"text": DOCS[0]}) + "\n")  # exact duplicate
        f.write(
            json.dumps({"text": "  " + DOCS[1].replace("w", "W", 1) + "\r\n"}) + "\n"
        )  # near duplicate
    (src / "sub" / "b.txt").write_text("\n\n".join(DOCS[30:] + ZH), encoding="utf-8")
    return src


def run(cfg):
    return prepare(cfg, progress=False)


def test_prepare_end_to_end_shards_decode_to_clean_documents(tmp_path, corpus):
    cfg = cfg_for(tmp_path / "out", [corpus], data={"txt_unit": "paragraph"})
    summary = run(cfg)
    docs = summary["docs"]
    assert docs["documents_read"] == 64
    assert docs["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert docs["documents_kept"] == 62
    out = tmp_path / "out"
    tok = Tokenizer.load(out / "tokenizer")
    meta = load_meta(out / "shards")
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["dtype"] == "uint16"
    for split in ("train", "val"):
        texts = [d["text"] for d in read_docs(out / "docs" / f"{split}.jsonl")]
        s = open_split(out / "shards", split)
        assert s.num_documents == len(texts) == meta["splits"][split]["documents"]
        decoded = [tok.decode(ids) for ids in s.documents()]
        assert decoded == texts
        eos = [t[e - 1] for t, st in zip(s.tokens, s.starts) for e in st[1:]]
        assert all(x == meta["eos_id"] for x in eos)
    all_texts = {
        d["text"] for sp in ("train", "val") for d in read_docs(out / "docs" / f"{sp}.jsonl")
    }
    assert set(DOCS) | set(ZH) == all_texts  # cleaned = original here; nothing else lost
    assert (out / "config.toml").is_file() and load_config(out / "config.toml") == cfg


def test_split_is_deterministic_and_order_independent(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    b.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(DOCS)))
    val = []
    for name, src in (("x", a), ("y", b)):
        run(cfg_for(tmp_path / name, [src], data={"dedup": "none"}))
        val.append(sorted(d["text"] for d in read_docs(tmp_path / name / "docs" / "val.jsonl")))
    assert val[0] == val[1]
    assert val[0] == sorted(d for d in DOCS if split_key(d) < 0.2)
    assert 0 < len(val[0]) < len(DOCS)


def test_rerun_is_a_noop_and_changes_rebuild(tmp_path, corpus):
    cfg = cfg_for(tmp_path / "out", [corpus])
    run(cfg)
    shard = tmp_path / "out" / "shards" / "train-00000.bin"
    mtime = shard.stat().st_mtime_ns
    run(cfg)
    assert shard.stat().st_mtime_ns == mtime
    run(
        cfg_for(tmp_path / "out", [corpus], tokenizer={"vocab_size": 420})
    )  # new tokenizer -> new shards
    assert (
        load_meta(tmp_path / "out" / "shards")["vocab_size"]
        == Tokenizer.load(tmp_path / "out" / "tokenizer").vocab_size
    )
    assert shard.stat().st_mtime_ns != mtime


def test_shards_roll_over_without_splitting_documents(tmp_path, corpus):
    run(cfg_for(tmp_path / "out", [corpus], data={"shard_tokens": 500}))
    meta = load_meta(tmp_path / "out" / "shards")
    files = meta["splits"]["train"]["files"]
    assert len(files) > 2
    s = open_split(tmp_path / "out" / "shards", "train")
    assert all(
        len(t) <= 500 or len(st) == 2 for t, st in zip(s.tokens, s.starts)
    )  # a long doc stays whole
    assert s.num_tokens == meta["splits"]["train"]["tokens"]


def test_char_and_wordpiece_pipelines(tmp_path, corpus):
    for kind, vocab in (("char", 400), ("wordpiece", 300)):
        out = tmp_path / kind
        summary = run(cfg_for(out, [corpus], tokenizer={"kind": kind, "vocab_size": vocab}))
        assert summary["tokenizer"]["kind"] == kind
        assert set(summary["tokenizer"]["compression_val"]) <= {"zh", "en"}


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "d.parquet")
    summary = run(cfg_for(tmp_path / "out", [tmp_path / "d.parquet"], data={"text_field": "body"}))
    assert summary["docs"]["documents_kept"] == len(DOCS)
    with pytest.raises(ValueError, match="no column 'text'.*body"):
        run(cfg_for(tmp_path / "o2", [tmp_path / "d.parquet"]))


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty", "empty corpus"),
        ("undecodable", r"bad.txt: invalid UTF-8 at byte offset 9 \(line 2\)"),
        ("badjson", r"bad.jsonl:2: invalid JSON"),
        ("nofield", r"bad.jsonl:1: no field 'text'; fields present: body"),
        ("vocab", "vocab_size=100 is too small"),
        ("suffix", "unsupported file type '.pdf'"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(tmp_path, corpus, case, message):
    out = tmp_path / "out"
    run(cfg_for(out, [corpus]))  # a good run first: the bad one must leave it untouched
    before = _snapshot(out)
    inputs, over = [corpus], {}
    if case == "missing":
        inputs = [tmp_path / "nope.txt"]
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("  \n\n")
        inputs = [tmp_path / "empty.txt"]
    elif case == "undecodable":
        (tmp_path / "bad.txt").write_bytes(b"hello\nok \xff\xfe\n")
        inputs = [corpus, tmp_path / "bad.txt"]
    elif case in ("badjson", "nofield"):
        body = '{"text": "fine"}\n{"text": oops}\n' if case == "badjson" else '{"body": "x"}\n'
        (tmp_path / "bad.jsonl").write_text(body)
        inputs = [tmp_path / "bad.jsonl"]
    elif case == "vocab":
        over = {"tokenizer": {"vocab_size": 100}}
    elif case == "suffix":
        (tmp_path / "x.pdf").write_bytes(b"%PDF")
        inputs = [tmp_path / "x.pdf"]
    with pytest.raises(ValueError, match=message):
        run(cfg_for(out, inputs, data={"val_fraction": 0.3}, **over))
    assert _snapshot(out) == before
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_fresh_output_dir_is_not_created_on_error(tmp_path):
    with pytest.raises(ValueError):
        run(cfg_for(tmp_path / "new" / "deeper", [tmp_path / "nope.txt"]))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError):
        run(cfg_for(tmp_path / "new" / "deeper", [tmp_path / "e.txt"]))
    assert not (tmp_path / "new").exists()


def test_replace_policy_keeps_going(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text\n\nbad \xff byte\n")
    summary = run(
        cfg_for(
            tmp_path / "out",
            [tmp_path / "bad.txt"],
            data={"encoding_errors": "replace", "txt_unit": "paragraph", "val_fraction": 0.5},
        )
    )
    texts = {
        d["text"]
        for s in ("train", "val")
        for d in read_docs(tmp_path / "out" / "docs" / f"{s}.jsonl")
    }
    assert texts == {"good text", "bad \ufffd byte"}
    assert summary["docs"]["documents_kept"] == 2


def test_single_document_cannot_be_split(tmp_path):
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(ValueError, match="txt_unit=paragraph"):
        run(cfg_for(tmp_path / "out", [tmp_path / "one.txt"]))
    run(cfg_for(tmp_path / "out", [tmp_path / "one.txt"], data={"val_fraction": 0.0}))
    assert open_split(tmp_path / "out" / "shards", "val").num_documents == 0


def test_memmap_dtype_uint32_for_large_vocab():
    from zerolm.data.shards import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_a_full_disk_is_one_line_naming_the_directory_and_leaves_nothing_partial(
    corpus, tmp_path, monkeypatch
):
    import errno

    from zerolm.data import shards

    def disk_fills(
        self, ids
    ):  # fault injection: the shard file's write hits a full disk after some bytes
        self._f = self._f or open(self.out_dir / "train-00000.bin", "wb")
        self._f.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards.ShardWriter, "add", disk_fills)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        run(cfg_for(out, [corpus]))
    assert str(e.value).startswith(
        f"could not write the token shards into {out / 'shards'}: the disk is full"
    )
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.toml",
        "docs",
        "tokenizer",
    ]  # no shards, no temp dir
    monkeypatch.undo()
    assert (
        run(cfg_for(out, [corpus]))["shards"]["splits"]["train"]["tokens"] > 0
    )  # space again: it carries on
