"""Held-out splits by a hash of each item's text: deterministic and independent of input order."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def split_key(text: str, person: bytes = b"zerolm-split") -> float:
    """A uniform number in [0, 1) from the text: documents below val_fraction go to validation,
    so the split is deterministic and independent of input order. `person` salts the hash (the
    seq2seq pairs keep their unsalted one)."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=person).digest()
    return int.from_bytes(h, "big") / 2**64


def split_by_hash(
    items: Iterable[T], key: Callable[[T], str], val_fraction: float
) -> tuple[list[T], list[T]]:
    """(train, val) in input order: an item is held out when split_key(key(item)) < val_fraction."""
    train: list[T] = []
    val: list[T] = []
    for item in items:
        (val if split_key(key(item)) < val_fraction else train).append(item)
    return train, val
