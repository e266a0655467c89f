"""Vocabulary extension of a byte-level BPE tokenizer, such as Chinese on an English base.

New tokens become real BPE vocabulary entries, each with the merges that build it appended after
the base's (a 3-byte Han character the base splits into 3 tokens needs an intermediate byte-pair
token too), not "added tokens" matched before pre-tokenization. Measured on SmolLM2 + Tang poems,
merges compress as well or better (their byte-pair intermediates help characters not chosen), and:
- text the new merges cannot touch (any text without the new tokens' bytes) encodes exactly as
  before, since appended merges rank after every base merge;
- llama.cpp runs the same ranked BPE over GGUF merges, while it matches "user defined" added
  tokens longest-first over the whole text (HF: leftmost-longest), which differs for overlapping
  words ("中国" / "国人" in "中国人"), and scans the text once per added token;
- tokenizer_config.json needs no change (no new added_tokens_decoder entries).
"""

from __future__ import annotations

import json
import operator
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from zerolm.tokenizer.pieces import byte_level_alphabet
from zerolm.tokenizer.report import compression_report
from zerolm.tokenizer.tokenizer import Tokenizer

# Runs of Han characters: CJK Unified Ideographs, Extension A, compatibility, Extensions B-H.
HAN_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+")


@dataclass(frozen=True)
class Extension:
    """An extended tokenizer: `added` (the requested tokens, in merge order) and `intermediate`
    (the byte-pair tokens they are built from that the base lacked, as bytes: part of a
    character)."""

    tokenizer: Tokenizer
    added: tuple[str, ...]
    intermediate: tuple[bytes, ...]


def check_extendable(tok: Tokenizer) -> None:
    """ValueError unless `tok` is a byte-level BPE tokenizer (the only kind extended by merges)."""
    data = json.loads(tok.hf.to_str())
    byte_level = '"ByteLevel"' in json.dumps(data.get("pre_tokenizer"))
    if data["model"]["type"] != "BPE" or tok.kind != "bpe" or not byte_level:
        kind = "char" if tok.kind == "char" else data["model"]["type"]
        raise ValueError(
            f"tokenizer extend needs a byte-level BPE tokenizer (GPT-2/LLaMA-3/SmolLM style); "
            f"this one is {kind}: train a bpe tokenizer with `zerolm tokenizer train` instead"
        )


def han_counts(docs: Iterable[str]) -> tuple[Counter, Counter]:
    """(characters, two-character words) of the Han runs in `docs`, with their counts."""
    chars: Counter[str] = Counter()
    pairs: Counter[str] = Counter()
    for text in docs:
        for run in HAN_RUN.findall(text):
            chars.update(run)
            pairs.update(map(operator.add, run, run[1:]))
    return chars, pairs


def choose_tokens(tok: Tokenizer, chars: Counter, pairs: Counter, count: int) -> list[str]:
    """The `count` Han characters and words that save the most tokens: a character the base splits
    into k tokens saves (k - 1) per use, a word of two single tokens saves 1 per use (and needs its
    characters chosen first). Ones the base has as one token are skipped; a word is a candidate
    only where the pre-tokenizer keeps it whole (zerolm's own splits every Han character)."""
    if count < 1:
        raise ValueError(f"--count must be at least 1 (got {count})")
    words = [w for w, n in pairs.most_common(4 * count) if n > 1 and _one_pretoken(tok, w)]
    names = [c for c, n in chars.items() if n > 1] + words
    sizes = dict(zip(names, map(len, tok.encode_batch(names))))
    scored = [(n * (sizes[c] - 1), c) for c, n in chars.items() if sizes.get(c, 1) > 1]
    scored += [(pairs[w], w) for w in words if sizes[w] > 1]
    scored.sort(key=lambda s: (-s[0], len(s[1]), s[1]))  # ties: characters before words
    out: list[str] = []
    have: set[str] = set()
    for _, t in scored:
        if len(t) > 1 and not all(c in have or sizes.get(c) == 1 for c in t):
            continue
        out.append(t)
        have.add(t)
        if len(out) == count:
            break
    if not out:
        raise ValueError(
            "the corpus has no Han character or word (seen twice or more) that the tokenizer "
            "splits into several tokens: nothing to add"
        )
    return out


def _one_pretoken(tok: Tokenizer, text: str) -> bool:
    pre = tok.hf.pre_tokenizer
    return pre is None or len(pre.pre_tokenize_str(text)) == 1


def _check_tokens(tok: Tokenizer, tokens: list[str]) -> None:
    if not tokens:
        raise ValueError("no tokens to add: give one token per line in --add FILE")
    if dupes := sorted({t for t in tokens if tokens.count(t) > 1}):
        raise ValueError(f"token(s) listed twice: {dupes[:5]}; list each once")
    sizes = dict(zip(tokens, map(len, tok.encode_batch(tokens))))
    if present := [t for t in tokens if sizes[t] == 1 or tok.hf.token_to_id(t) is not None]:
        raise ValueError(
            f"{len(present)} token(s) already in the vocabulary as one token: {present[:5]}; "
            "remove them from the list"
        )
    if split := [t for t in tokens if not _one_pretoken(tok, t)]:
        raise ValueError(
            f"token(s) {split[:5]} span several pre-tokens (words, spaces or digits that the "
            "pre-tokenizer cuts apart), so BPE can never produce them as one token"
        )
    norm = tok.hf.normalizer
    if norm is not None and (odd := [t for t in tokens if norm.normalize_str(t) != t]):
        raise ValueError(f"token(s) {odd[:5]} change under the tokenizer's normalizer")
    specials = tok.special_ids
    if bad := [t for t in tokens if specials & set(tok.encode(t))]:
        raise ValueError(f"token(s) {bad[:5]} contain a special token; remove them")


def _apply(ranks: dict[tuple[str, str], int], parts: list[str]) -> list[str]:
    """Ranked BPE over the appended merges only (the base merges have already run on `parts`)."""
    while len(parts) > 1:
        found = [(ranks[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in ranks]
        if not found:
            break
        _, i = min(found)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def extend_tokenizer(tok: Tokenizer, tokens: list[str], source: str | Path) -> Extension:
    """`tok` with `tokens` added as BPE vocabulary entries (ids after every existing one) and the
    merges that build them appended after the base's. `source`: the directory `tok` was loaded
    from (a foreign tokenizer reads its roles and chat template there)."""
    check_extendable(tok)
    _check_tokens(tok, tokens)
    raw = tok.files.get("tokenizer.json")  # a foreign file as written (its padding settings too)
    data = json.loads(raw if raw is not None else tok.hf.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list = data["model"]["merges"]
    as_str = bool(merges) and isinstance(merges[0], str)  # older files: "a b" strings
    known = {tuple(m.split(" ", 1)) if as_str else tuple(m) for m in merges}
    next_id = 1 + max([*vocab.values(), *(a["id"] for a in data.get("added_tokens", []))])
    ranks: dict[tuple[str, str], int] = {}
    ordered = sorted(tokens, key=len)  # characters before the words made of them
    for text in ordered:
        parts = _apply(
            ranks, [str(t) for t in tok.hf.encode(text, add_special_tokens=False).tokens]
        )
        cur = parts[0]
        for piece in parts[1:]:
            if (cur, piece) not in known:
                known.add((cur, piece))
                ranks[(cur, piece)] = len(ranks)
                merges.append(f"{cur} {piece}" if as_str else [cur, piece])
            cur += piece
            if cur not in vocab:
                vocab[cur] = next_id
                next_id += 1
    text_json = json.dumps(data, ensure_ascii=False, indent=2)
    hf = _HFTokenizer.from_str(text_json)
    if missed := [t for t in ordered if len(hf.encode(t, add_special_tokens=False).ids) != 1]:
        raise ValueError(
            f"token(s) {missed[:5]} cannot be made one BPE token on this base (its merges build "
            "other tokens from their bytes first); remove them from the list"
        )
    if tok.layout == "hf":
        new = Tokenizer(hf, "hf", Path(source))
        new.files["tokenizer.json"] = text_json.encode("utf-8")  # save() writes this one
    else:
        new = Tokenizer(hf, tok.layout)
    added = {vocab[_byte_level(t)] for t in ordered}
    inter = tuple(
        new.token_bytes[i] for i in range(tok.vocab_size, new.vocab_size) if i not in added
    )
    return Extension(new, tuple(ordered), inter)


def _byte_level(text: str) -> str:
    table = byte_level_alphabet()
    return "".join(table[b] for b in text.encode("utf-8"))


def compare(before: Tokenizer, after: Tokenizer, docs: list[str]) -> dict:
    """{lang: {documents, bytes, tokens_before, tokens_after, bytes_per_token_before/after}}."""
    a, b = compression_report(before, docs), compression_report(after, docs)
    return {
        lang: {
            "documents": s["documents"],
            "bytes": s["bytes"],
            "tokens_before": s["tokens"],
            "tokens_after": b[lang]["tokens"],
            "bytes_per_token_before": s["bytes_per_token"],
            "bytes_per_token_after": b[lang]["bytes_per_token"],
        }
        for lang, s in a.items()
    }
