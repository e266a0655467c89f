"""Build the bundled chat (supervised fine-tuning) corpora in ``zerolm/data/chat/``.

This is a *packaging-time* tool. Its outputs are committed to the repository, so
nothing here is needed when zerolm is installed or run, and nothing is fetched at
run time. Provenance, counts and licences go to ``zerolm/data/chat/LICENSES.md``,
which this script writes too.

Every output line is one conversation in the OpenAI chat form, plus provenance::

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...],
     "source": ..., "id": ...}

Messages always alternate user/assistant, start with user and end with assistant.

Sources and conversion rules
----------------------------
* ``chitchat.jsonl.xz`` from ``chitchat_dataset/dataset.json`` in the wheel
  ``chitchat-dataset==0.9.0`` (MIT). Each conversation is a list of turns, each
  turn a list of ``{text, sender, timestamp}`` messages.

  - Each message is stripped of leading/trailing whitespace; empty ones are
    dropped. Nothing else in the text is changed (no lowercasing, no spelling
    fixes).
  - Conversations with more than two distinct senders are dropped.
  - The sender of the first (non-empty) message is the ``user``, the other one
    the ``assistant``.
  - Consecutive messages from the same sender (within a turn, or across turns
    that became adjacent because a turn was left empty) are joined with ``\\n``.
  - Trailing user messages are dropped so the conversation ends with the
    assistant; conversations with no user+assistant exchange left (e.g. the
    one-sender monologues where no partner ever replied) are dropped.
  - ``source`` is ``"chitchat"``, ``id`` the conversation key of dataset.json.
    Sorted by id. The ``prompt``/``ratings``/timestamps are not kept.

* ``chatterbot_en.jsonl.xz`` / ``chatterbot_zh.jsonl.xz`` from
  ``chatterbot_corpus/data/{english,chinese}/*.yml`` in the wheel
  ``chatterbot-corpus==1.3.3`` (BSD-3-Clause). Files are read in sorted order.

  - YAML is read with PyYAML's ``BaseLoader``: every scalar comes back as its
    source text, so non-string scalars (``1963``, ``yes``) are coerced to str
    verbatim rather than reinterpreted (``True``, ``1963.0``).
  - Each ``conversations`` entry ``[q, a, ...]`` becomes alternating
    user/assistant messages; each is stripped; a trailing unanswered user
    message is dropped.
  - Malformed entries (not a list, a non-scalar or empty item, fewer than two
    items) are skipped and counted.
  - ``source`` is ``"chatterbot-<lang>/<file stem>"``, ``id`` is
    ``"<file stem>/<index of the entry in that file>"``. Duplicates are kept.

  The wheel ships no licence file, so the BSD licence text is taken from
  ``license.md`` in the same version's sdist (whose data files are identical).

Output is UTF-8 JSON Lines (``ensure_ascii=False``) compressed with ``lzma``
preset ``9 | PRESET_EXTREME``, exactly like ``scripts/build_corpora.py``; the
bytes are deterministic, so rerunning gives identical files. A JSON summary of
the counts is printed at the end.

How to rerun
------------
Needs ``pip`` with access to PyPI (or the three archives already in
``--download-dir``) and PyYAML (packaging-time only; not a zerolm dependency)::

    python scripts/build_chat_data.py [--download-dir DIR]

Archives already present in ``--download-dir`` (named as pip names them) are
reused; missing ones are downloaded there (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "zerolm" / "data" / "chat"
PRESET = 9 | lzma.PRESET_EXTREME

CHITCHAT = ("chitchat-dataset==0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl")
CHATTERBOT = ("chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl")
CHATTERBOT_SDIST = ("chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3.tar.gz")
CHITCHAT_JSON = "chitchat_dataset/dataset.json"
CHITCHAT_LICENSE = "chitchat_dataset-0.9.0.dist-info/LICENSE"
CHATTERBOT_LICENSE = "chatterbot_corpus-1.3.3/license.md"
LANGS = {"en": "english", "zh": "chinese"}  # output suffix -> chatterbot data folder


def fetch(dest: Path) -> dict[str, Path]:
    """The three source archives in ``dest``, downloading the missing ones with pip."""
    paths = {}
    for key, (spec, name) in {
        "chitchat": CHITCHAT,
        "chatterbot": CHATTERBOT,
        "sdist": CHATTERBOT_SDIST,
    }.items():
        path = dest / name
        if not path.exists():
            kind = (
                ["--no-binary", ":all:"] if name.endswith(".tar.gz") else ["--only-binary", ":all:"]
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    *kind,
                    spec,
                    "-d",
                    str(dest),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        paths[key] = path
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def build_chitchat(whl: Path) -> tuple[list[dict], dict]:
    with zipfile.ZipFile(whl) as z:
        data = json.loads(z.read(CHITCHAT_JSON).decode("utf-8"))
    stats = {
        "source_conversations": len(data),
        "empty_messages_dropped": 0,
        "dropped_more_than_2_senders": 0,
        "dropped_no_exchange": 0,
        "trailing_user_turns_dropped": 0,
    }
    records = []
    for cid in sorted(data):
        # Flatten turns into (sender, text); the turn boundaries carry no extra
        # information because merging same-sender runs reproduces them.
        msgs = []
        for t in data[cid]["messages"]:
            for m in t:
                text = m["text"].strip()
                if text:
                    msgs.append((m["sender"], text))
                else:
                    stats["empty_messages_dropped"] += 1
        if len({s for s, _ in msgs}) > 2:
            stats["dropped_more_than_2_senders"] += 1
            continue
        merged: list[list] = []  # [sender, [texts]]
        for sender, text in msgs:
            if merged and merged[-1][0] == sender:
                merged[-1][1].append(text)
            else:
                merged.append([sender, [text]])
        if len(merged) < 2:  # one speaker only (or nothing): no exchange
            stats["dropped_no_exchange"] += 1
            continue
        if len(merged) % 2:  # runs alternate user/assistant, so an odd count ends with the user
            merged.pop()
            stats["trailing_user_turns_dropped"] += 1
        messages = [
            turn("user" if i % 2 == 0 else "assistant", "\n".join(texts))
            for i, (_, texts) in enumerate(merged)
        ]
        records.append({"messages": messages, "source": "chitchat", "id": cid})
    return records, stats


def convert_entry(entry) -> list[dict] | None:
    """One chatterbot ``[q, a, ...]`` entry as chat messages, or None if malformed."""
    if not isinstance(entry, list) or len(entry) < 2:
        return None
    texts = []
    for item in entry:
        if not isinstance(item, str):  # BaseLoader: scalars are str; lists/dicts/None are not
            return None
        text = item.strip()
        if not text:
            return None
        texts.append(text)
    if len(texts) % 2:
        texts.pop()  # unanswered last user message
    return [turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]


def build_chatterbot(whl: Path, lang: str) -> tuple[list[dict], dict]:
    import yaml  # packaging-time only

    prefix = f"chatterbot_corpus/data/{LANGS[lang]}/"
    stats = {
        "files": [],
        "source_entries": 0,
        "malformed_skipped": 0,
        "trailing_user_turns_dropped": 0,
    }
    records = []
    with zipfile.ZipFile(whl) as z:
        names = sorted(
            n
            for n in z.namelist()
            if n.startswith(prefix) and n.endswith(".yml") and "/" not in n[len(prefix) :]
        )
        for name in names:
            stem = name[len(prefix) : -len(".yml")]
            doc = yaml.load(z.read(name).decode("utf-8"), Loader=yaml.BaseLoader) or {}
            entries = doc.get("conversations") or []
            stats["files"].append(stem)
            stats["source_entries"] += len(entries)
            for i, entry in enumerate(entries):
                messages = convert_entry(entry)
                if messages is None:
                    stats["malformed_skipped"] += 1
                    continue
                stats["trailing_user_turns_dropped"] += len(entry) % 2
                records.append(
                    {
                        "messages": messages,
                        "source": f"chatterbot-{lang}/{stem}",
                        "id": f"{stem}/{i}",
                    }
                )
    return records, stats


def write_xz(path: Path, records: list[dict]) -> dict:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, preset=PRESET)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(packed)
    tmp.replace(path)
    return {
        "conversations": len(records),
        "messages": sum(len(r["messages"]) for r in records),
        "characters": sum(len(m["content"]) for r in records for m in r["messages"]),
        "bytes_uncompressed": len(data),
        "bytes_xz": len(packed),
    }


def read_licenses(paths: dict[str, Path]) -> tuple[str, str]:
    with zipfile.ZipFile(paths["chitchat"]) as z:
        mit = z.read(CHITCHAT_LICENSE).decode("utf-8")
    with tarfile.open(paths["sdist"], "r:gz") as tar:
        bsd = tar.extractfile(CHATTERBOT_LICENSE).read().decode("utf-8")
    # Guard against silently shipping the wrong text if an archive changes.
    assert mit.startswith("MIT License") and "Permission is hereby granted" in mit, mit[:200]
    assert bsd.startswith("Copyright (c) 2017, Gunther Cox") and "Redistribution and use" in bsd, (
        bsd[:200]
    )
    return mit.strip("\n"), bsd.strip("\n")


def n(x: int) -> str:
    return f"{x:,}"


def licenses_md(paths, out, stats, mit, bsd) -> str:
    cc, en, zh = (
        out["chitchat.jsonl.xz"],
        out["chatterbot_en.jsonl.xz"],
        out["chatterbot_zh.jsonl.xz"],
    )
    s, sen, szh = stats["chitchat"], stats["chatterbot_en"], stats["chatterbot_zh"]
    return f"""\
# Bundled chat corpora: provenance and licences

The files in this directory are built at packaging time by
`scripts/build_chat_data.py` and committed to the repository; that script (and
its packaging-time-only dependency PyYAML) is not needed to install or run
zerolm, and nothing is downloaded at run time. Each file is UTF-8 JSON Lines
compressed with xz (`lzma` preset 9 | extreme); rebuilding gives byte-identical
files. Each line is one conversation in the OpenAI chat form:

```
{{"messages": [{{"role": "user", "content": "..."}}, \
{{"role": "assistant", "content": "..."}}, ...],
 "source": "...", "id": "..."}}
```

In every conversation the messages alternate `user`/`assistant`, starting
with `user` and ending with `assistant`; every content is a non-empty string.
Read them with `zerolm.data.chat_corpora.read_chat_corpus(name)`.

Source archives (sha256):

- `{paths["chitchat"].name}`: `{sha256(paths["chitchat"])}`
- `{paths["chatterbot"].name}`: `{sha256(paths["chatterbot"])}`
- `{paths["sdist"].name}` (licence text only): `{sha256(paths["sdist"])}`

---

## `chitchat.jsonl.xz`: open-domain human chit-chat (English)

- **Source package:** `chitchat-dataset`, version **0.9.0**, wheel from PyPI
  (obtained with `pip download --no-deps chitchat-dataset==0.9.0`); the BYU
  Perception, Control and Cognition lab's Chit-Chat Challenge data, real
  conversations between two people.
- **What was taken:** `chitchat_dataset/dataset.json` (the text and sender of
  each message; the prompts, ratings and timestamps were not kept).
- **Transformation:** each message was stripped of leading and trailing
  whitespace and dropped if then empty ({n(s["empty_messages_dropped"])} messages); the text is
  otherwise unchanged (no lowercasing or spelling fixes). The sender of the first
  message is the `user`, the other sender the `assistant`; consecutive messages
  from the same sender were joined with `\\n`. Trailing user messages were
  dropped so each conversation ends with the assistant
  ({n(s["trailing_user_turns_dropped"])} conversations). Dropped: conversations with more than two
  senders ({n(s["dropped_more_than_2_senders"])}) and conversations with no user+assistant exchange
  ({n(s["dropped_no_exchange"])}: one-sided, i.e. no partner ever replied), so
  {n(s["source_conversations"])} → {n(cc["conversations"])} conversations. Sorted by `id`.
- **Record fields:** `source` = `"chitchat"`, `id` = the conversation's key in
  `dataset.json`.
- **Counts:** {n(cc["conversations"])} conversations, {n(cc["messages"])} messages \
({n(cc["characters"])} characters of content).
- **Licence:** MIT, reproduced in full from the wheel's
  `chitchat_dataset-0.9.0.dist-info/LICENSE`:

```
{mit}
```

---

## `chatterbot_en.jsonl.xz` and `chatterbot_zh.jsonl.xz`: ChatterBot dialog corpus \
(English, Chinese)

- **Source package:** `chatterbot-corpus`, version **1.3.3**, wheel from PyPI
  (obtained with `pip download --no-deps chatterbot-corpus==1.3.3`). The wheel
  ships no licence file; the licence text below is `license.md` from the same
  version's sdist (`pip download --no-deps --no-binary :all:
  chatterbot-corpus==1.3.3`), whose data files are identical to the wheel's.
  The package describes its data as user-contributed.
- **What was taken:** the `conversations` lists of
  `chatterbot_corpus/data/english/*.yml` ({len(sen["files"])} files) and
  `chatterbot_corpus/data/chinese/*.yml` ({len(szh["files"])} files, simplified Chinese), in
  sorted file order; no other languages.
- **Transformation:** YAML read with PyYAML's `BaseLoader`, so every scalar
  keeps its source text (non-string scalars are coerced to str verbatim). Each
  entry `[q, a, ...]` became alternating user/assistant messages, each stripped
  of leading and trailing whitespace; an unanswered trailing user message was
  dropped (English {n(sen["trailing_user_turns_dropped"])}, \
Chinese {n(szh["trailing_user_turns_dropped"])}). Malformed entries (not a
  list, fewer than two items, a non-scalar or empty item) were skipped: English
  {n(sen["malformed_skipped"])} of {n(sen["source_entries"])}, \
Chinese {n(szh["malformed_skipped"])} of {n(szh["source_entries"])}. Duplicates were kept.
- **Record fields:** `source` = `"chatterbot-<lang>/<file stem>"` (`en` or
  `zh`), `id` = `"<file stem>/<index of the entry in the file>"`.
- **Counts (`chatterbot_en.jsonl.xz`):** {n(en["conversations"])} conversations, \
{n(en["messages"])} messages ({n(en["characters"])} characters of content).
- **Counts (`chatterbot_zh.jsonl.xz`):** {n(zh["conversations"])} conversations, \
{n(zh["messages"])} messages ({n(zh["characters"])} characters of content).
- **Licence:** BSD 3-Clause, reproduced in full from the sdist's `license.md`:

```
{bsd}
```
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--download-dir",
        type=Path,
        default=None,
        help="reuse/keep the source archives here (default: a temporary directory)",
    )
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args()
    try:
        import yaml  # noqa: F401  (checked before downloading anything)
    except ImportError:
        sys.exit("build_chat_data: PyYAML is missing; `pip install pyyaml` (packaging-time only).")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zerolm-chat-") as tmp:
        dest = args.download_dir or Path(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        paths = fetch(dest)
        built = {"chitchat": build_chitchat(paths["chitchat"])}
        for lang in LANGS:
            built[f"chatterbot_{lang}"] = build_chatterbot(paths["chatterbot"], lang)
        out = {
            f"{key}.jsonl.xz": write_xz(args.out_dir / f"{key}.jsonl.xz", records)
            for key, (records, _) in built.items()
        }
        stats = {key: st for key, (_, st) in built.items()}
        mit, bsd = read_licenses(paths)
        md = licenses_md(paths, out, stats, mit, bsd)
    (args.out_dir / "LICENSES.md").write_text(md, encoding="utf-8")
    print(json.dumps({"outputs": out, "stats": stats}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
