"""What the Trainer draws micro-batches from: the Batches protocol, and Stream for a plain
iterator."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Batches(Protocol):
    """A stage's batch iterator: next(batches) is one micro-batch; its state_dict is saved in each
    checkpoint and loaded on resume and rollback, so the data continues where it was."""

    def __next__(self): ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Stream:
    """Batches without a position to resume from (a plain iterator, e.g. a list in a test): its
    state is empty, and a resume or rollback does not rewind it."""

    def __init__(self, batches: Iterable):
        self.it = iter(batches)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
