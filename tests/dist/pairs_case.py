"""Poem preference pairs sampled under torchrun (`... pairs_case.py MODEL_DIR OUT`): each rank
samples its share of the batches; rank 0 saves the pairs and how many batches each rank sampled."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

from zerolm.config import DistConfig
from zerolm.data.sources import corpus_path, xz_rows
from zerolm.model import load_model
from zerolm.tasks.poems import pairs
from zerolm.tasks.poems.requests import poem_instructions
from zerolm.tokenizer import Tokenizer

ARGS = dict(samples=2, max_new_tokens=12, batch_size=2, seed=7)


def requests() -> list[dict]:
    """The poem requests of the bundled Tang corpus's first 3 poems that make one."""
    return list(itertools.islice(poem_instructions(xz_rows(corpus_path("tang"))), 3))


def sample(model_dir: Path) -> tuple[list, dict, int]:
    """(pairs, counts, batches this process sampled) for the requests."""
    calls = 0
    real = pairs.replies

    def counted(*a, **kw):  # the real sampler, counted
        nonlocal calls
        calls += 1
        return real(*a, **kw)

    pairs.replies = counted
    try:
        got, counts = pairs.poem_pairs(
            load_model(model_dir), Tokenizer.load(model_dir), requests(), **ARGS
        )
    finally:
        pairs.replies = real
    return got, counts, calls


def main(model_dir: Path, out: Path) -> None:
    from zerolm.dist import group

    group.init(DistConfig())
    got, counts, calls = sample(model_dir)
    each = group.all_gather(calls)
    if group.is_main():
        torch.save({"pairs": got, "counts": counts, "calls": each}, out / "pairs.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
