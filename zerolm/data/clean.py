"""Text cleanup and quality filters for one document (pure functions)."""

from __future__ import annotations

import re
import unicodedata

from zerolm.config import DataConfig

# control characters except tab/newline, plus invisible format characters (BOM, zero-width space,
# bidi marks, word joiner) that only add noise; ZWJ (U+200D) stays, emoji sequences need it.
_DROP = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060\ufeff]"
)
_SPACES = re.compile(
    r"[^\S \n\t\u3000]"
)  # Unicode spaces (NBSP, thin space...) but not ASCII or ideographic
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC; newlines normalised to \\n; control/invisible characters dropped; exotic spaces -> ' ';
    trailing spaces on lines and more than one blank line in a row removed; ends stripped."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _DROP.sub("", text)
    text = _SPACES.sub(" ", text)
    # per-line rstrip, not a `[ \t]+\n` regex: that one rescans a run of spaces from each start
    # (quadratic)
    text = "\n".join(line.rstrip(" \t\u3000") for line in text.split("\n"))
    text = _BLANKS.sub("\n\n", text)
    return text.strip()


def letter_fraction(text: str) -> float:
    """Share of characters that are letters or digits (a crude quality signal)."""
    if not text:
        return 0.0
    return sum(ch.isalnum() for ch in text) / len(text)


def filter_reason(text: str, cfg: DataConfig) -> str | None:
    """Why a cleaned document is dropped, or None to keep it."""
    if not text:
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars and len(text) > cfg.max_chars:
        return "too_long"
    if cfg.min_letter_frac and letter_fraction(text) < cfg.min_letter_frac:
        return "low_letters"
    return None
