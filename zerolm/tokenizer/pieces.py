"""What a vocabulary's token strings stand for: the kind of a tokenizer.json (wordpiece, byte-level
bpe, spm, char) and the UTF-8 bytes of each token (exact where a token is part of a character)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from tokenizers import Tokenizer as _HFTokenizer

from zerolm.tokenizer.specials import BYTE_TOKENS


def kind_of(spec: dict) -> str:
    """wordpiece; bpe (byte-level: GPT-2's byte alphabet); spm (SentencePiece style: "\u2581" for
    space, <0xNN> byte fallback, BPE or Unigram: Llama 2, Mistral v1, Phi-3); char (zerolm's
    byte-fallback BPE over characters, no "\u2581"; any other vocabulary of plain text pieces)."""
    if spec["model"]["type"] == "WordPiece":
        return "wordpiece"
    parts = [spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")]
    types = {t for p in parts for t in _types(p)}
    if "ByteLevel" in types:
        return "bpe"
    if "Metaspace" in types or "\u2581" in json.dumps(parts, ensure_ascii=False):
        return "spm"
    return "char"


def token_bytes_of(hf: _HFTokenizer, kind: str, specials: frozenset[int]) -> list[bytes]:
    """The UTF-8 bytes each token id stands for (b"" for the ids in `specials`). An added
    non-special token ("<think>", a word added by `tokenizer extend`) is its own text."""
    byte_tokens = {t: i for i, t in enumerate(BYTE_TOKENS)}
    unicode_to_byte = {c: b for b, c in byte_level_alphabet().items()}
    out = [b""] * hf.get_vocab_size(with_added_tokens=True)
    added = hf.get_added_tokens_decoder()
    for tok, i in hf.get_vocab(with_added_tokens=True).items():
        if i in specials:
            continue
        if i in added:
            out[i] = added[i].content.encode("utf-8")
        elif kind == "bpe":  # byte-level alphabet: one character per byte
            out[i] = bytes(unicode_to_byte[c] for c in tok)
        elif tok in byte_tokens and kind in ("char", "spm"):  # byte fallback <0xNN>
            out[i] = bytes([byte_tokens[tok]])
        elif kind == "spm":  # SentencePiece: "▁" is a space
            out[i] = tok.replace("\u2581", " ").encode("utf-8")
        elif kind == "wordpiece":  # continuation pieces carry a '##' prefix
            out[i] = tok.removeprefix("##").encode("utf-8")
        else:
            out[i] = tok.encode("utf-8")
    return out


def _types(part) -> Iterator[str]:
    """Every component "type" in a tokenizer.json part (normalizer, pre_tokenizer, decoder),
    through Sequence nesting."""
    if isinstance(part, dict):
        if isinstance(part.get("type"), str):
            yield part["type"]
        for value in part.values():
            yield from _types(value)
    elif isinstance(part, list):
        for value in part:
            yield from _types(value)


def byte_level_alphabet() -> dict[int, str]:
    """byte -> character of the byte-level BPE alphabet (GPT-2's): printable Latin-1 bytes map to
    themselves, the other 68 to code points from 256 on, in byte order."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
