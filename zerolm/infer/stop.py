"""Stop strings on streamed text. The engine speaks token ids; this lives at the text edge."""

from __future__ import annotations


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where `text` must be cut for the (non-empty) `stops`, or None if none occurs.

    The earliest stop wins by where it ends (ties: the longest), not where it begins: a
    generator halts on the first stop completed, so with stops ["c", "aca"] the text "aca"
    is cut at 1. This keeps the cut the same however the text is split into chunks.
    """
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return min(hits)[1] if hits else None


class StopStrings:
    """Cut a stream of decoded text at the first stop string, even one split across chunks.

    `feed` holds back any suffix that could be the start of a stop string, so no part of a
    stop string is ever emitted; `flush` releases what is held once generation ends.
    """

    def __init__(self, stops: list[str]):
        if any(s == "" for s in stops):
            raise ValueError(f"stop strings must be non-empty, got {stops!r}")
        self.stops = list(stops)
        self._held = ""
        self.stopped = False

    def _hold_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def feed(self, delta: str) -> tuple[str, bool]:
        """Take the next chunk; return (text safe to emit now, stopped). After a stop,
        the rest of the stream is discarded and every call returns ("", True)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        i = find_stop(text, self.stops)
        if i is not None:
            self.stopped, self._held = True, ""
            return text[:i], True
        cut = len(text) - self._hold_len(text)
        self._held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """End of generation: the held-back text ("" if a stop string was hit)."""
        held, self._held = self._held, ""
        return held
