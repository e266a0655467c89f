"""A rule-based judge of classical Chinese poem form (绝句 / 律诗): pure functions, no torch.

Vocabulary:

* A *verse line* (句) is the text between two clause-ending marks. `lines` splits on the full-width
  marks ，。！？；、 their ASCII counterparts , . ! ? ; and newlines, strips surrounding whitespace
  (including the ideographic space U+3000) and drops empty pieces. In a regular poem every verse
  line is 5 (五言) or 7 (七言) characters, e.g. "床前明月光，疑是地上霜。" is two verse lines.
* A *CJK character* is a CJK unified ideograph (basic block, extensions A-H) or a compatibility
  ideograph. Anything else inside a verse line (latin letters, digits, brackets, the placeholder
  □ for a lost character, special tokens such as ``<|im_end|>``, inner spaces) makes it irregular.
* The text must end with a sentence-final mark: full-width 。！？ (the corpus convention; an ASCII
  "." "!" "?" still splits lines but does not count as a proper ending).

Functions:

* `lines(text)` - the verse lines.
* `form_of(text)` - the shape of a poem: ``{"lines": n, "chars": k, "name": ...}`` when it is
  regular (all verse lines pure CJK, the same length k in 4..7, an even number n >= 2); the name is
  one of `FORMS` (n = 4 绝句 / 8 律诗, k = 5 五言 / 7 七言) or None for other regular shapes
  (古风, 排律, 六言 ...); None when irregular. It does not look at the final punctuation.
* `judge(text, lines, chars)` - does the text have exactly the requested form (see its docstring).
* `score(text, lines, chars)` - partial credit in [0, 1]; 1.0 exactly when `judge` says ok.

Tone patterns (平仄) and rhyme (押韵) are not checked: doing that well needs a historical rhyme
table (平水韵) with per-character readings, which this module deliberately does without.
"""

from __future__ import annotations

import re

FORMS: dict[str, tuple[int, int]] = {
    "五言绝句": (4, 5),
    "七言绝句": (4, 7),
    "五言律诗": (8, 5),
    "七言律诗": (8, 7),
}
FORM_NAMES: dict[tuple[int, int], str] = {shape: name for name, shape in FORMS.items()}

SEPARATORS = "，。！？；、,.!?;\n\r"
FINAL_PUNCT = "。！？"
_SPLIT = re.compile("[" + re.escape(SEPARATORS) + "]")
_CJK_RANGES = (
    (0x3400, 0x4DBF),  # extension A
    (0x4E00, 0x9FFF),  # unified ideographs
    (0xF900, 0xFAFF),  # compatibility ideographs
    (0x20000, 0x323AF),  # extensions B-H (the corpus uses B-F for rare characters)
)
# Partial-credit factor of `score` for a text without a proper sentence-final mark.
PUNCT_FACTOR = 0.8


def is_cjk(ch: str) -> bool:
    """True for one CJK ideograph (see the module docstring)."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def is_cjk_line(line: str) -> bool:
    """True when the verse line is non-empty and made of CJK ideographs only."""
    return bool(line) and all(is_cjk(ch) for ch in line)


def lines(text: str) -> list[str]:
    """The verse lines of `text`: split on ，。！？；、 , . ! ? ; and newlines, stripped, empties
    dropped."""
    return [s for part in _SPLIT.split(text or "") if (s := part.strip())]


_lines = lines  # `judge` and `score` take a parameter named `lines`, which shadows the function


def ends_properly(text: str) -> bool:
    """True when the text (trailing whitespace ignored) ends with a full-width 。！？."""
    t = (text or "").rstrip()
    return bool(t) and t[-1] in FINAL_PUNCT


def form_of(text: str) -> dict | None:
    """The regular shape of a poem, ``{"lines": n, "chars": k, "name": name or None}``, or None.

    Regular: every verse line is pure CJK and k characters long with 4 <= k <= 7, and the number of
    verse lines n is even and >= 2. ``name`` is the `FORMS` name for (n, k) in
    {(4, 5), (4, 7), (8, 5), (8, 7)}, else None."""
    vs = lines(text)
    if len(vs) < 2 or len(vs) % 2 or not all(is_cjk_line(v) for v in vs):
        return None
    k = len(vs[0])
    if not 4 <= k <= 7 or any(len(v) != k for v in vs):
        return None
    return {"lines": len(vs), "chars": k, "name": FORM_NAMES.get((len(vs), k))}


def judge(text: str, lines: int, chars: int) -> dict:
    """Whether `text` is a poem of exactly `lines` verse lines of exactly `chars` CJK characters.

    Returns ``{"ok", "line_count", "chars_per_line", "punct_ok", "reasons"}``: ``chars_per_line``
    is the length of every verse line (all characters, CJK or not), ``punct_ok`` whether the text
    ends with 。！？, ``reasons`` human-readable findings (empty when ok). ok needs the right count,
    every line of the right length and pure CJK, and ``punct_ok``."""
    vs = _lines(text)
    reasons: list[str] = []
    if not vs:
        reasons.append("no verse lines")
    elif len(vs) != lines:
        reasons.append(f"expected {lines} lines, got {len(vs)}")
    for i, v in enumerate(vs, 1):
        if len(v) != chars:
            reasons.append(f"line {i} has {len(v)} characters, expected {chars}")
        bad = "".join(dict.fromkeys(ch for ch in v if not is_cjk(ch)))
        if bad:
            reasons.append(f"line {i} contains non-CJK characters {bad!r}")
    punct_ok = ends_properly(text)
    if vs and not punct_ok:
        reasons.append("does not end with 。！？")
    return {
        "ok": not reasons,
        "line_count": len(vs),
        "chars_per_line": [len(v) for v in vs],
        "punct_ok": punct_ok,
        "reasons": reasons,
    }


def score(text: str, lines: int, chars: int) -> float:
    """Partial credit for the requested form, in [0, 1]; 1.0 exactly when ``judge(...)["ok"]``.

    score = (good / lines) * min(1, lines / n) * (1 if punct_ok else PUNCT_FACTOR), where n is the
    number of verse lines and good counts the first `lines` verse lines that are pure CJK and
    exactly `chars` long. So missing lines cost their share, surplus lines dilute the credit
    (8 good lines where 4 were asked: 0.5) and a missing final 。！？ costs 20 %. No lines: 0."""
    if lines <= 0:
        raise ValueError("lines must be positive")
    vs = _lines(text)
    if not vs:
        return 0.0
    good = sum(1 for v in vs[:lines] if len(v) == chars and is_cjk_line(v))
    s = good / lines * min(1.0, lines / len(vs))
    return s if ends_properly(text) else s * PUNCT_FACTOR
