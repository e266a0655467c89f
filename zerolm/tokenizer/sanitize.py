"""Control tokens typed into a conversation are text, never turn boundaries.

A user who writes "<|im_end|><|im_start|>assistant" in a message must not forge a turn. This is
transformers' `apply_chat_template(..., sanitize_control_tokens=True)` (5.x), step for step, so the
ids are the same: every control token in the messages is wrapped in two private-use markers before
rendering; the rendered chat is cut at the markers; marked tokens are encoded as plain text (no
added tokens matched) and the rest normally. Each piece is encoded after a "\\n" that is then
dropped, so a SentencePiece tokenizer adds no prefix space mid-chat. Content without control
tokens renders to one piece: the same ids as encoding the whole text.

Control tokens: the tokenizer's special tokens, plus the non-special added tokens the template
spells in its literal text (or those listed as "chat_control_tokens" in tokenizer_config.json).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.nodes
from tokenizers import Tokenizer as _HFTokenizer

START, END = "\U000f0000", "\U000f0001"  # transformers' markers (chat_template_utils.py)

Offsets = list[tuple[int, int]]


def control_tokens(hf: _HFTokenizer, env: jinja2.Environment, source: str, listed) -> tuple:
    """The added tokens that count as control tokens for this template (see the module doc)."""
    added = hf.get_added_tokens_decoder().values()
    if listed is not None:
        return tuple(t.content for t in added if t.special or t.content in set(listed))
    ast = env.parse(source)
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    text = "\0".join(literals)  # NUL-joined: no match across two literals
    return tuple(
        t.content for t in added if t.special or (t.content in text and not t.content.isspace())
    )


@lru_cache
def patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """(any of `tokens`, a marked token or a lone marker); longer tokens first."""
    any_re = re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")
    return any_re, re.compile(f"{START}({any_re.pattern}){END}|[{START}{END}]")


def mark(obj: Any, tokens_re: re.Pattern) -> Any:
    """Wrap each control token in the strings of `obj` (messages: lists, dicts) in the markers;
    markers already there are dropped first, so none can be forged. Dict keys are not marked."""
    if isinstance(obj, str):
        obj = obj.replace(START, "").replace(END, "")
        return tokens_re.sub(f"{START}\\g<0>{END}", obj)
    if isinstance(obj, dict):
        return {k: mark(v, tokens_re) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark(v, tokens_re) for v in obj]
    return obj


def unmark(text: str) -> str:
    return text.replace(START, "").replace(END, "")


def _plain_ids(hf: _HFTokenizer, text: str) -> tuple[list[int], Offsets]:
    """`text` through the pipeline without added tokens (transformers'
    _encode_without_added_tokens); every token gets the whole text's span (enough for a mask)."""
    if hf.normalizer is not None:
        text = hf.normalizer.normalize_str(text)
    splits = [text]
    if hf.pre_tokenizer is not None:
        splits = [s for s, _ in hf.pre_tokenizer.pre_tokenize_str(text)]
    ids = [t.id for s in splits for t in hf.model.tokenize(s)]
    return ids, [(0, len(text))] * len(ids)


def _normal_ids(hf: _HFTokenizer, text: str) -> tuple[list[int], Offsets]:
    enc = hf.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets


def _piece(hf: _HFTokenizer, piece: str, as_text: bool, newline: list[int]) -> tuple[list, Offsets]:
    """A piece from the middle of a chat, encoded after a "\\n" that is then removed."""
    encode = _plain_ids if as_text else _normal_ids
    ids, offsets = encode(hf, "\n" + piece)
    if ids[: len(newline)] == newline:
        cut = len(newline)
        return ids[cut:], [(max(a - 1, 0), max(b - 1, 0)) for a, b in offsets[cut:]]
    return encode(hf, piece)


def encode_marked(hf: _HFTokenizer, chat: str) -> tuple[list[int], Offsets]:
    """(ids, character offsets into `chat`) of a chat rendered from marked messages: marked control
    tokens as plain text, the template's own ones as tokens (transformers' encode_marked_chat)."""
    _, markers = patterns(tuple(t.content for t in hf.get_added_tokens_decoder().values()))
    newline = hf.encode("\n", add_special_tokens=False).ids
    pos, first = 0, True
    ids: list[int] = []
    offsets: Offsets = []
    for m in [*markers.finditer(chat), None]:
        text = chat[pos : len(chat) if m is None else m.start()]
        pieces = [(text, pos, False)]
        if m is not None and m.group(1) is not None:
            pieces.append((m.group(1), m.start(1), True))
        for piece, at, as_text in pieces:
            if first:  # the chat's start: encoded as is
                part = _normal_ids(hf, piece)
                first = False
            elif not piece:
                continue
            else:
                part = _piece(hf, piece, as_text, newline)
            if as_text and hf.token_to_id(piece) in part[0]:
                raise ValueError(
                    f"cannot keep {piece!r} as text: this tokenizer makes it from plain text too"
                )
            ids += part[0]
            offsets += [(a + at, b + at) for a, b in part[1]]
        if m is not None:
            pos = m.end()
    return ids, offsets
