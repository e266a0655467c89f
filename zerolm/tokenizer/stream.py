"""Incremental detokenisation for streaming: token ids in, text deltas out."""
from __future__ import annotations

from zerolm.tokenizer import Tokenizer


class StreamDecoder:
    """push(id) returns the new text; a character split across byte tokens is held back until
    complete, so no U+FFFD replacement ever reaches the user mid-stream."""

    def __init__(self, tok: Tokenizer, skip_ids: tuple[int, ...] = (), skip_special: bool = False):
        self.tok, self.skip, self.skip_special = tok, set(skip_ids), skip_special
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, self.skip_special)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta

    def flush(self) -> str:
        text = self.tok.decode(self.ids, self.skip_special)
        delta, self.sent = text[self.sent :], len(text)
        return delta
