"""Bundled chat corpora for supervised fine-tuning, streamed from ``zerolm/data/chat/``.

Each corpus is xz-compressed JSON Lines built at packaging time by
``scripts/build_chat_data.py`` (provenance and licences: ``zerolm/data/chat/LICENSES.md``).
Every record is ``{"messages": [{"role": "user"|"assistant", "content": str}, ...],
"source": str, "id": str}``; messages alternate user/assistant, starting with the user and
ending with the assistant.
"""

from __future__ import annotations

from collections.abc import Iterator

from zerolm.data.sources import bundled_path, xz_rows

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
    return bundled_path("chat", name.replace("-", "_"))


def read_chat_corpus(name: str) -> Iterator[dict]:
    """Yield the conversations of chat corpus ``name`` one at a time, in file order."""
    yield from xz_rows(chat_corpus_path(name))
