"""Instruction data for supervised fine-tuning: read, validate, encode, pack into batches.

Files are JSON Lines in either form (one conversation per line):
  OpenAI  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  Alpaca  {"instruction": "...", "input": "..." (optional), "output": "..."}

Too long for the window: a conversation is cut after its last assistant turn that fits (later
turns dropped, counted as `truncated`); one whose first assistant turn does not fit is skipped
(counted as `skipped_too_long`). Never cut inside a turn: only where the rendering after an
assistant turn is a token prefix of the whole (a foreign template's `ends`; -1 where not).

Packing: conversations are laid end to end in rows of seq_len positions; each keeps its own
positions (from 0) and attention segment, so a packed row computes exactly what each
conversation computes alone. Legend: B rows, T = seq_len.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from zerolm.data.sources import jsonl_rows
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import check_messages, render

log = logging.getLogger(__name__)


def to_messages(row, where: str) -> list[dict]:
    """One JSONL row (OpenAI or Alpaca form) -> validated messages."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
    elif "instruction" in row and "output" in row:
        for key in ("instruction", "input", "output"):
            if not isinstance(row.get(key, ""), str):
                raise ValueError(f"{where}: '{key}' must be a string")
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": row["output"]},
        ]
    else:
        raise ValueError(
            f'{where}: expected {{"messages": [...]}} or {{"instruction", "output"}}, '
            f"got keys {sorted(row)}"
        )
    check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message: nothing to learn from")
    return messages


def read_located(path: str | Path) -> list[tuple[str, list[dict]]]:
    """("file:line", conversation) for each row of a JSONL file; a malformed line is a ValueError
    naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"SFT data file {str(path)!r} does not exist")
    out = [(where, to_messages(row, where)) for where, row in jsonl_rows(p)]
    if not out:
        raise ValueError(f"{p}: no conversations")
    return out


def read_conversations(path: str | Path) -> list[list[dict]]:
    """All conversations of a JSONL file (read_located without the locations)."""
    return [messages for _, messages in read_located(path)]


def encode_conversations(
    tok: Tokenizer,
    conversations: Iterable[list[dict]],
    seq_len: int,
    wheres: Sequence[str] | None = None,
) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """(ids, loss_mask) per conversation through the model's chat template, at most seq_len + 1
    tokens (seq_len training positions), and counts of what the length rule did. `wheres` names
    each conversation ("file:line") in the error when its template refuses it."""
    examples, stats = [], {"conversations": 0, "truncated": 0, "skipped_too_long": 0}
    for i, messages in enumerate(conversations):
        stats["conversations"] += 1
        try:
            ids, mask, ends = render(tok, messages)
        except ValueError as e:
            raise ValueError(f"{wheres[i] if wheres else f'conversation {i}'}: {e}") from None
        if len(ids) > seq_len + 1:
            # a turn boundary that is a token prefix (a foreign template may have none: -1)
            fits = [
                e
                for m, e in zip(messages, ends)
                if m["role"] == "assistant" and 0 < e <= seq_len + 1
            ]
            if not fits:
                stats["skipped_too_long"] += 1
                continue
            stats["truncated"] += 1
            ids, mask = ids[: fits[-1]], mask[: fits[-1]]
        examples.append((ids, mask))
    return examples, stats


OPEN_ROWS = (
    64  # first fit among the last 64 rows: fills 80 % of a poem-set row (T = 128) vs 65 % for 1
)


def assign_rows(lengths: list[int], order, seq_len: int, packing: bool) -> list[list[int]]:
    """Example indices per row: each example (`lengths[i]` positions) goes, in `order`, into the
    first of the last OPEN_ROWS rows with room (packing), or into a row of its own."""
    rows: list[list[int]] = []
    used: list[int] = []  # positions filled per row
    for i in order:
        n = lengths[i]
        r = next(
            (r for r in range(max(0, len(rows) - OPEN_ROWS), len(rows)) if used[r] + n <= seq_len),
            None,
        )
        if not packing or r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += n
    return rows


def pack(
    examples: list[tuple[list[int], list[int]]], order, seq_len: int, packing: bool
) -> list[torch.Tensor]:
    """Rows of (5, T) int64: x, y, loss mask, positions, segment (rows as assign_rows lays them
    out; an example of len(ids) tokens gives len(ids) - 1 positions). Padding is id 0
    (any vocabulary's: it is masked out of the loss, in a segment (-1) of its own)."""
    out = []
    for members in assign_rows([len(ids) - 1 for ids, _ in examples], order, seq_len, packing):
        row = torch.zeros(5, seq_len, dtype=torch.long)
        row[4] = -1
        a = 0
        for seg, i in enumerate(members):
            ids, mask = examples[i]
            n = len(ids) - 1
            row[0, a : a + n] = torch.tensor(ids[:-1])
            row[1, a : a + n] = torch.tensor(ids[1:])
            row[2, a : a + n] = torch.tensor(mask[1:])
            row[3, a : a + n] = torch.arange(n)
            row[4, a : a + n] = seg
            a += n
        out.append(row)
    return out


class SFTBatches:
    """Infinite iterator of (x, y, loss_mask, positions, segments) batches, each (B, T) int64.

    Each epoch shuffles the conversations with (seed, epoch), packs them, and yields consecutive
    groups of batch_size rows (the last group may be smaller). state_dict()/load_state_dict()
    resume exactly."""

    def __init__(
        self, examples, *, batch_size: int, seq_len: int, seed: int = 0, packing: bool = True
    ):
        if not examples:
            raise ValueError(
                "no SFT examples to train on: none given, or every first answer is longer than "
                f"the window ({seq_len} tokens); use shorter conversations or a longer "
                "--model.max_seq_len"
            )
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.seed, self.packing = seed, packing
        self.epoch, self.step = 0, 0
        self._rows_epoch = -1
        self._rows: list[torch.Tensor] = []

    def _epoch_rows(self) -> list[torch.Tensor]:
        if self._rows_epoch != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
            self._rows, self._rows_epoch = (
                pack(self.examples, order, self.seq_len, self.packing),
                self.epoch,
            )
        return self._rows

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        rows = self._epoch_rows()
        if self.step * self.batch_size >= len(rows):
            self.epoch, self.step = self.epoch + 1, 0
            rows = self._epoch_rows()
        batch = torch.stack(
            rows[self.step * self.batch_size : (self.step + 1) * self.batch_size], 1
        )  # (5, B, T)
        self.step += 1
        return tuple(batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["batch"])


def fill_rate(examples, seq_len: int, packing: bool) -> float:
    """Share of row positions that hold conversation tokens (the rest is padding)."""
    lengths = [len(ids) - 1 for ids, _ in examples]
    rows = assign_rows(lengths, range(len(examples)), seq_len, packing)
    return sum(lengths) / (len(rows) * seq_len) if rows else 0.0  # none: SFTBatches says why
