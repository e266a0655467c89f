"""Pre-tokenizers by llama.cpp name (`tokenizer.ggml.pre`) as each family's HF tokenizer.json has
them, and the patterns a new zerolm BPE tokenizer trains with.

The table is built from llama.cpp's src/llama-vocab.cpp (`regex_exprs` per LLAMA_VOCAB_PRE_TYPE:
a list of regexes applied one after another = a Sequence of isolating Splits), so a GGUF's
tokenizer can be rebuilt and a tokenizer exported under the name llama.cpp splits it by.
`PRE[name]` holds the pre_tokenizer (and normalizer) JSON; `pre_name(tok)` finds a tokenizer's
name by comparing normalised JSON. `TRAIN_PRE` are the patterns a new zerolm BPE tokenizer can
train with (TokenizerConfig.pre): llama.cpp ones, and zerolm's older Han-isolating one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as _HFTokenizer

if TYPE_CHECKING:
    from zerolm.tokenizer.tokenizer import Tokenizer

LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek's Latin/Greek/Cyrillic... letters, its ASCII + CJK punctuation, and its CJK runs
DEEPSEEK_LATIN = (  # as escapes: the exact code points matter
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
DEEPSEEK_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# zerolm's pattern before GGUF export: GPT-2's, with every Han character and digit on its own.
# llama.cpp has no pre-tokenizer that isolates Han characters, so it cannot be exported.
ZEROLM_HAN = (
    r"'(?i:[sdmt]|ll|ve|re)|\p{Han}| ?[\p{L}\p{M}&&[^\p{Han}]]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def byte_level(use_regex: bool) -> dict:
    """GPT-2's byte alphabet; use_regex=True also splits with GPT-2's own pattern first."""
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": use_regex,
    }


def digits(individual: bool) -> dict:
    return {"type": "Digits", "individual_digits": individual}


def sequence(*parts: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": list(parts)}


NFC = {"type": "NFC"}


@dataclass(frozen=True)
class Pre:
    """A family's pre-tokenizer JSON, its normalizer (llama.cpp applies none) and whether llama.cpp
    looks a whole pre-token up in the vocabulary before merging (HF BPE `ignore_merges`)."""

    pre_tokenizer: dict
    normalizer: dict | None = None
    ignore_merges: bool = False


_STARCODER = Pre(sequence(digits(True), byte_level(True)))
_LLAMA3 = Pre(sequence(split(LLAMA3), byte_level(False)), ignore_merges=True)
_QWEN2 = Pre(sequence(split(QWEN2), byte_level(False)), NFC)
# name -> family, for tokenizer.ggml.model "gpt2". Names with the same splitting: the first is the
# one export writes (smollm, not starcoder: llama.cpp leaves decoded spaces alone for it, as zerolm)
PRE: dict[str, Pre] = {
    "gpt-2": Pre(byte_level(True)),
    "mpt": Pre(byte_level(True)),
    "smollm": _STARCODER,
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "command-r": Pre(_STARCODER.pre_tokenizer, NFC),
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "qwen35": Pre(sequence(split(QWEN35), byte_level(False))),
    "deepseek-llm": Pre(
        sequence(
            split(r"[\r\n]"),
            split(DEEPSEEK_LATIN),
            split(DEEPSEEK_PUNCT),
            split(r"\s+$"),
            split(DEEPSEEK_CJK),
            digits(False),
            byte_level(False),
        )
    ),
    "deepseek-coder": Pre(
        sequence(
            split(r"[\r\n]"),
            split(r"\s?\p{L}+"),
            split(r"\s?\p{P}+"),
            split(DEEPSEEK_CJK),
            digits(True),
            byte_level(False),
        )
    ),
    "falcon": Pre(
        sequence(
            {"type": "Punctuation", "behavior": "Contiguous"},
            byte_level(True),
            digits(False),
            split(r"[0-9][0-9][0-9]"),
        )
    ),
}

# names whose splitting llama.cpp's own regex engine does not reproduce exactly (found with
# llama-tokenize): a zerolm tokenizer is never exported under them
NOT_EXACT = {
    "deepseek-llm": "llama.cpp splits spaces before U+3000 (ideographic space) otherwise: "
    '"  \\u3000" is [" ", " ", "\\u3000"] in HF, ["  ", "\\u3000"] in llama.cpp',
}

# TokenizerConfig.pre: the pre-tokenizer a new zerolm BPE tokenizer trains with
TRAIN_PRE: dict[str, dict] = {
    "qwen2": PRE["qwen2"].pre_tokenizer,
    "deepseek-llm": PRE["deepseek-llm"].pre_tokenizer,
    "zerolm-han": sequence(split(ZEROLM_HAN), byte_level(False)),
}


def pre_tokenizer(spec: dict):
    """A `tokenizers` pre-tokenizer object from its JSON."""
    base = {"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}
    return _HFTokenizer.from_str(json.dumps({**base, "pre_tokenizer": spec})).pre_tokenizer


def normalise(spec: Any) -> Any:
    """JSON with what does not change the split left out: a one-part Sequence is its part,
    offsets trimming is dropped, absent defaults are filled in."""
    if isinstance(spec, list):
        return [normalise(s) for s in spec]
    if not isinstance(spec, dict):
        return spec
    if spec.get("type") == "Sequence":
        parts = [normalise(p) for p in spec.get("pretokenizers", [])]
        return parts[0] if len(parts) == 1 else {"type": "Sequence", "pretokenizers": parts}
    out = {k: normalise(v) for k, v in spec.items() if k != "trim_offsets"}
    if out.get("type") == "ByteLevel":
        out.setdefault("use_regex", True)
        out.setdefault("add_prefix_space", True)
    if out.get("type") == "Split":
        out.setdefault("invert", False)
    return out


def pre_name_of(spec: dict | None) -> str | None:
    """The first llama.cpp name whose pre-tokenizer JSON is `spec` (normalised), else None."""
    if spec is None:
        return None
    want = normalise(spec)
    return next((n for n, p in PRE.items() if normalise(p.pre_tokenizer) == want), None)


def pre_name(tok: Tokenizer) -> str | None:
    """The llama.cpp name whose pre-tokenizer is exactly the one `tok`'s tokenizer.json holds."""
    return pre_name_of(json.loads(tok.hf.to_str()).get("pre_tokenizer"))
