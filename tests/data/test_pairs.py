import json

import pytest

from zerolm.config import Seq2SeqConfig
from zerolm.data.pairs import load_pairs, read_bible


def test_bundled_bible_is_verse_aligned_and_held_out_by_book():
    rows = read_bible()
    assert len(rows) == 31099
    john = next(r for r in rows if (r["book"], r["chapter"], r["verse"]) == ("John", 3, 16))
    assert john["kjv"].startswith("For God so loved the world, that he gave his only begotten Son")
    assert john["web"].startswith("For God so loved the world, that he gave his one and only Son")
    assert all(
        "  " not in r["web"] and r["web"] == r["web"].strip() for r in rows
    )  # whitespace normalised
    pairs, info = load_pairs(Seq2SeqConfig(builtin="bible", val_books=("Ruth", "Jonah")))
    assert info["val"] == 85 + 48 and info["train"] == 31099 - 133
    val = set(pairs["val"])
    ruth = [(r["kjv"], r["web"]) for r in rows if r["book"] == "Ruth"]
    assert set(ruth) <= val and not val & set(pairs["train"][:100])


def test_jsonl_and_aligned_files_split_deterministically(tmp_path):
    rows = [{"src": f"source {i}", "tgt": f"target {i}"} for i in range(200)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Seq2SeqConfig(
        data=(str(tmp_path / "p.jsonl"),), source_field="src", target_field="tgt", val_fraction=0.2
    )
    a, info = load_pairs(cfg)
    b, _ = load_pairs(cfg)
    assert a == b and info["train"] + info["val"] == 200 and 15 <= info["val"] <= 65
    assert ("source 7", "target 7") in a["train"] + a["val"]
    (tmp_path / "s.txt").write_text("".join(f"source {i}\n" for i in range(200)))
    (tmp_path / "t.txt").write_text(
        "".join(f"target {i}\n" for i in range(200)) + "\n"
    )  # a trailing blank line is fine
    c, _ = load_pairs(
        Seq2SeqConfig(
            source=str(tmp_path / "s.txt"), target=str(tmp_path / "t.txt"), val_fraction=0.2
        )
    )
    assert c == a  # same pairs, same hash split, whatever the file format


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: Seq2SeqConfig(), "no pairs"),
        (lambda d: Seq2SeqConfig(builtin="quran"), "unknown seq2seq.builtin 'quran'"),
        (
            lambda d: Seq2SeqConfig(builtin="bible", val_books=("Hesitations",)),
            "not books of the bundled Bible",
        ),
        (
            lambda d: Seq2SeqConfig(source=d("a\nb\nc\n"), target=d("A\nB\n")),
            "3 lines but .* has 2: .*line-aligned",
        ),
        (
            lambda d: Seq2SeqConfig(source=d("a\n\nc\n"), target=d("A\nB\nC\n")),
            r":2 .*the source is empty",
        ),
        (
            lambda d: Seq2SeqConfig(data=(d('{"source": "a"}\n', ".jsonl"),)),
            r":1: no field 'target'",
        ),
        (lambda d: Seq2SeqConfig(data=(d('{"source": "a", \n', ".jsonl"),)), r":1: invalid JSON"),
    ],
)
def test_bad_pairs_are_clear_errors(tmp_path, setup, message):
    made = []

    def write(text, suffix=".txt"):
        path = tmp_path / f"f{len(made)}{suffix}"
        path.write_text(text)
        made.append(path)
        return str(path)

    with pytest.raises(ValueError, match=message):
        load_pairs(setup(write))


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    first = b'{"source": "a", "target": "b"}\n'
    bad.write_bytes(first + b'{"source": "caf\xe9", "target": "c"}\n')
    at = len(first) + len('{"source": "caf')
    with pytest.raises(
        ValueError,
        match=rf"pairs.jsonl: invalid UTF-8 at byte offset {at} \(line 2\); convert the "
        r"file to UTF-8$",
    ):
        load_pairs(Seq2SeqConfig(data=(str(bad),)))
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_bytes(b"one\r\ntwo\r\n")
    tgt.write_bytes(b"eins\n\xff\xfezwei\n")
    with pytest.raises(ValueError, match=r"t.txt: invalid UTF-8 at byte offset 5 \(line 2\)"):
        load_pairs(Seq2SeqConfig(source=str(src), target=str(tgt)))
    tgt.write_bytes(
        "eins\nzwei\u2028drei\n".encode()
    )  # only \n ends a line: U+2028 inside one is text
    pairs, _ = load_pairs(Seq2SeqConfig(source=str(src), target=str(tgt), val_fraction=0.0))
    assert pairs["train"] == [("one", "eins"), ("two", "zwei\u2028drei")]
