"""eval_mode(model): evaluation mode (no dropout) for a block, then the caller's mode back.

Here, in eval/, so that everything that measures a model (eval/, and train/, finetune/, align/
above it) shares one context instead of saving and restoring model.training by hand."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar


class _HasModes(Protocol):
    """What eval_mode needs: an nn.Module, or a LanguageModel (zerolm/model/protocol.py)."""

    training: bool

    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...


M = TypeVar("M", bound=_HasModes)


@contextlib.contextmanager
def eval_mode(model: M) -> Iterator[M]:
    """model.eval() inside the block; on leaving it (also by an exception), the mode it had."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
