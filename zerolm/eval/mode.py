"""eval_mode(model): evaluation mode (no dropout) for a block, then the caller's mode back.

Here, in eval/, so that everything that measures a model (eval/, and train/, finetune/, align/
above it) shares one context instead of saving and restoring model.training by hand."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() inside the block; on leaving it (also by an exception), the mode it had."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
