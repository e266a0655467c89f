"""Preference pairs: JSONL rows {"prompt" or "messages", "chosen", "rejected"} -> validated pairs.

`prompt` is a user message; `messages` a conversation ending with a user turn (the chat template
then asks for the assistant's reply). `chosen` and `rejected` are the two replies, as strings (or
{"role": "assistant", "content"} objects). A malformed row is a ValueError naming file and line;
a pair whose replies are identical teaches nothing and is skipped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from zerolm.data.sources import bundled_path, jsonl_rows, xz_rows
from zerolm.tokenizer.chat import check_messages

log = logging.getLogger(__name__)

BUILTIN_PAIRS = {
    "hhh": "Anthropic HHH alignment (BIG-bench hhh_alignment), 221 human-written pairs, English, "
    "Apache-2.0"
}


@dataclass(frozen=True)
class Preference:
    messages: tuple  # the conversation so far: dicts with role/content, ending with the user
    chosen: str
    rejected: str
    where: str = ""  # "file:line" or "builtin:id", for messages about this pair


def _reply(value, key: str, where: str) -> str:
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: '{key}' must be a string (or an assistant message), got "
            f"{type(value).__name__}"
        )
    if not value.strip():
        raise ValueError(f"{where}: '{key}' is empty: a preference needs two real replies")
    return value


def _messages(row: dict, where: str) -> tuple:
    """The conversation a row asks to answer: its "prompt" as a user message, or its "messages"."""
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        return ({"role": "user", "content": row["prompt"]},)
    messages = row["messages"]
    check_messages(messages, where)
    if messages[-1]["role"] != "user":
        raise ValueError(
            f"{where}: 'messages' must end with a user message (the replies answer it)"
        )
    return tuple(dict(m) for m in messages)


def to_pair(row, where: str) -> Preference:
    """One row -> a Preference, or a ValueError naming the problem and the fix."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing or ("prompt" in row) == ("messages" in row):
        raise ValueError(
            f'{where}: expected {{"prompt" or "messages", "chosen", "rejected"}}, '
            f"got keys {sorted(row)}"
        )
    return Preference(
        _messages(row, where),
        _reply(row["chosen"], "chosen", where),
        _reply(row["rejected"], "rejected", where),
        where,
    )


def read_prompts(path: str | Path) -> list[dict]:
    """PPO prompts from a JSONL file: rows with "prompt" or "messages" (preference rows too: their
    replies are ignored). Each becomes {"messages": [...], **the row's other fields}, so a reward
    function can read its own metadata (e.g. an expected answer)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    out = []
    for where, row in jsonl_rows(p):
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
            raise ValueError(
                f'{where}: expected an object with "prompt" or "messages" (ending with a user turn)'
            )
        meta = {
            k: v for k, v in row.items() if k not in ("prompt", "messages", "chosen", "rejected")
        }
        out.append({**meta, "messages": list(_messages(row, where)), "where": where})
    if not out:
        raise ValueError(f"{p}: no prompts")
    return out


def keep_distinct(pairs, source: str) -> tuple[list[Preference], int]:
    """Drop pairs whose chosen and rejected replies are the same text; (kept, number skipped)."""
    kept = [p for p in pairs if p.chosen.strip() != p.rejected.strip()]
    skipped = len(pairs) - len(kept)
    if skipped:
        log.warning(
            "%s: skipped %d pair(s) whose chosen and rejected replies are identical",
            source,
            skipped,
        )
    return kept, skipped


def read_pairs(path: str | Path) -> tuple[list[Preference], int]:
    """(pairs, identical pairs skipped) of a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"preference file {str(path)!r} does not exist")
    pairs, skipped = keep_distinct([to_pair(row, where) for where, row in jsonl_rows(p)], str(p))
    if not pairs:
        raise ValueError(f"{p}: no usable preference pairs")
    return pairs, skipped


def read_builtin_pairs(name: str) -> list[Preference]:
    """A bundled set (BUILTIN_PAIRS); provenance in zerolm/data/prefs/LICENSES.md."""
    if name not in BUILTIN_PAIRS:
        raise ValueError(f"unknown preference set {name!r}; bundled: {', '.join(BUILTIN_PAIRS)}")
    return [to_pair(r, f"builtin:{r['id']}") for r in xz_rows(bundled_path("prefs", name))]
