"""Growing a decoder's vocabulary (after `zerolm tokenizer extend`): the token embedding and an
untied LM head get new rows at the mean of the existing ones, so old tokens' logits are unchanged
on text without new tokens, and a new token starts as an "average" token rather than noise.
`extend_model` extends a model directory's tokenizer (zerolm/tokenizer/extend.py) and resizes its
model together.

Legend: V old vocabulary, N new vocabulary, D d_model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from zerolm.config import DataConfig
from zerolm.data.sources import CORPORA, iter_docs
from zerolm.data.split import split_key
from zerolm.files import atomic_dir, writing_into
from zerolm.model import Transformer, load_model, save_model
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.extend import Extension, extend_tokenizer

VAL_FRACTION = 0.05  # held out by document hash, as `zerolm prepare` holds out by default


def _grown(weight: torch.Tensor, new_size: int, start: int) -> torch.Tensor:  # (V, D) -> (N, D)
    kept = weight[:start]  # (start, D)
    mean = kept.double().mean(0, keepdim=True).to(weight.dtype)  # (1, D), accumulated in float64
    return torch.cat([kept, mean.expand(new_size - start, -1)])


def resize_vocab(model: Transformer, new_size: int, start: int | None = None) -> Transformer:
    """Give `model` a vocabulary of `new_size` ids in place (and return it): rows 0..start-1 of
    tok_emb and lm_head are kept exactly, rows from `start` on (default: the old size V) are the
    mean of the kept rows of each; model.cfg.vocab_size becomes new_size. A tied head stays tied
    (it is tok_emb). start < V re-initialises padding rows a checkpoint had beyond its tokenizer
    (Qwen2 has 151,936 rows for 151,665 tokens). Shrinking is refused."""
    if not isinstance(model, Transformer):
        raise ValueError(
            f"resize_vocab supports decoder models (Transformer), not {type(model).__name__}"
        )
    old = model.tok_emb.weight  # (V, D)
    if new_size < old.shape[0]:
        raise ValueError(
            f"cannot shrink the vocabulary from {old.shape[0]} to {new_size}: "
            "removing tokens would renumber the ids the model was trained on"
        )
    start = old.shape[0] if start is None else start
    if not 0 < start <= old.shape[0]:
        raise ValueError(f"start={start} must be within 1..{old.shape[0]} (the kept rows)")
    if new_size == start:
        return model
    with torch.no_grad():
        emb = nn.Embedding(new_size, old.shape[1], device=old.device, dtype=old.dtype)
        emb.weight.copy_(_grown(old, new_size, start))
        emb.weight.requires_grad_(old.requires_grad)
        model.tok_emb = emb
        if model.lm_head is not None:  # untied head: its own mean row
            w = model.lm_head.weight  # (V, D)
            head = nn.Linear(w.shape[1], new_size, bias=False, device=w.device, dtype=w.dtype)
            head.weight.copy_(_grown(w, new_size, start))
            head.weight.requires_grad_(w.requires_grad)
            model.lm_head = head
    model.cfg = dataclasses.replace(model.cfg, vocab_size=new_size)
    return model


def split_corpus(path: str) -> tuple[list[str], list[str]]:
    """(train, held-out) texts of a bundled corpus name or a file/directory, split by document
    hash as `zerolm prepare` splits (its validation documents are never counted here)."""
    cfg = DataConfig(corpus=(path,)) if path in CORPORA else DataConfig(inputs=(path,))
    train: list[str] = []
    held: list[str] = []
    for doc in iter_docs(cfg):
        (held if split_key(doc.text) < VAL_FRACTION else train).append(doc.text)
    return train, held


def extend_model(model_dir: str | Path, out_dir: str | Path, tokens: list[str]) -> Extension:
    """Write `model_dir` extended by `tokens` to `out_dir` (a new directory, written atomically):
    the extended tokenizer's files, and the model with tok_emb / lm_head resized (new rows at the
    mean row). Every check runs before anything is written."""
    src, out = Path(model_dir), Path(out_dir)
    if out.exists() and (out.resolve() == src.resolve() or any(out.iterdir())):
        raise ValueError(
            f"--out {out} already exists: choose a new directory for the extended model"
        )
    tok = Tokenizer.load(src)
    ext = extend_tokenizer(tok, tokens, src)
    model = load_model(src)
    resize_vocab(model, max(ext.tokenizer.vocab_size, model.cfg.vocab_size), start=tok.vocab_size)
    with writing_into(out.parent, "the extended model"), atomic_dir(out) as tmp:
        save_model(model, tmp, ext.tokenizer)
    return ext
