"""Bundled chat corpora for supervised fine-tuning, streamed from ``zerolm/data/chat/``.

Each corpus is xz-compressed JSON Lines built at packaging time by
``scripts/build_chat_data.py`` (provenance and licences: ``zerolm/data/chat/LICENSES.md``).
Every record is ``{"messages": [{"role": "user"|"assistant", "content": str}, ...],
"source": str, "id": str}``; messages alternate user/assistant, starting with the user and
ending with the assistant.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterator
from importlib import resources

CHAT_CORPORA = {
    "chitchat": "Open-domain human chit-chat (English), 4,017 two-person conversations; "
    "chitchat-dataset 0.9.0, MIT",
    "chatterbot-en": "ChatterBot dialog corpus, English, 2,025 short Q/A exchanges; "
    "chatterbot-corpus 1.3.3, BSD-3-Clause",
    "chatterbot-zh": "ChatterBot dialog corpus, simplified Chinese, 467 short Q/A exchanges; "
    "chatterbot-corpus 1.3.3, BSD-3-Clause",
}


def chat_corpus_path(name: str):
    """The bundled file of chat corpus ``name`` (an importlib.resources Traversable)."""
    if name not in CHAT_CORPORA:
        raise ValueError(
            f"unknown chat corpus {name!r}; bundled chat corpora: {', '.join(CHAT_CORPORA)}"
        )
    # Names use '-' (like CLI values); file names use '_' (like Python modules).
    return resources.files("zerolm.data") / "chat" / f"{name.replace('-', '_')}.jsonl.xz"


def read_chat_corpus(name: str) -> Iterator[dict]:
    """Yield the conversations of chat corpus ``name`` one at a time, in file order."""
    with chat_corpus_path(name).open("rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
