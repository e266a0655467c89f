"""Compression of a tokenizer per language (by dominant script) on held-out text."""

from __future__ import annotations

from collections.abc import Iterable

from zerolm.tokenizer.tokenizer import Tokenizer


def script_of(text: str) -> str:
    """'zh' when Han characters dominate the letters, 'en' for Latin, else 'other'."""
    han = latin = other = 0
    for ch in text[:4000]:
        if not ch.isalpha():
            continue
        if (
            "\u4e00" <= ch <= "\u9fff"
            or "\u3400" <= ch <= "\u4dbf"
            or "\U00020000" <= ch <= "\U0002ffff"
        ):
            han += 1
        elif ch.isascii() or "\u00c0" <= ch <= "\u024f":
            latin += 1
        else:
            other += 1
    top = max(han, latin, other)
    if top == 0:
        return "other"
    return "zh" if top == han else "en" if top == latin else "other"


def compression_report(tok: Tokenizer, docs: Iterable[str]) -> dict:
    """{lang: {documents, bytes, chars, tokens, bytes_per_token, chars_per_token}}."""
    stats: dict[str, dict] = {}
    for text, ids in tok.encode_stream(docs):
        s = stats.setdefault(script_of(text), {"documents": 0, "bytes": 0, "chars": 0, "tokens": 0})
        s["documents"] += 1
        s["bytes"] += len(text.encode("utf-8"))
        s["chars"] += len(text)
        s["tokens"] += len(ids)
    for s in stats.values():
        s["bytes_per_token"] = round(s["bytes"] / max(s["tokens"], 1), 3)
        s["chars_per_token"] = round(s["chars"] / max(s["tokens"], 1), 3)
    return dict(sorted(stats.items()))
