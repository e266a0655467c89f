"""Incremental detokenisation for streaming: token ids in, text deltas out."""

from __future__ import annotations

from zerolm.tokenizer.tokenizer import Tokenizer


class StreamDecoder:
    """push(id) returns the new text; a character split across byte tokens is held back until
    complete, so no U+FFFD replacement ever reaches the user mid-stream.

    Each push decodes only the last few tokens: the text new since `read` is what decoding
    ids[prefix:] adds to decoding ids[prefix:read] (the extra context keeps decoders that join
    tokens with spaces, e.g. WordPiece, exact), so a long stream costs O(1) per token."""

    def __init__(self, tok: Tokenizer, skip_ids: tuple[int, ...] = (), skip_special: bool = False):
        self.tok, self.skip, self.skip_special = tok, set(skip_ids), skip_special
        self.ids: list[int] = []
        self.prefix = self.read = (
            0  # ids[prefix:read] is context already emitted; ids[read:] is pending
        )

    def _new_text(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip_special)
        after = self.tok.decode(self.ids[self.prefix :], self.skip_special)
        return after[len(before) :]

    def push(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        self.ids.append(token_id)
        text = self._new_text()
        if not text or text.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        self.prefix, self.read = self.read, len(self.ids)
        return text

    def flush(self) -> str:
        text = self._new_text()
        self.prefix = self.read = len(self.ids)
        return text
