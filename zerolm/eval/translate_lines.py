"""Translate lines with an encdec model and score them against line-aligned references: what
`zerolm translate` runs ([translate] and [sample] sections)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from zerolm.config import SampleConfig, TranslateConfig
from zerolm.eval.translation import score, translate_texts
from zerolm.infer.text import sampling_params
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Translations:
    sources: list[str]
    hypotheses: list[str]
    scores: dict | None  # with references: pairs, BLEU and chrF, and the copy-the-source baseline


def read_lines(path: str, flag: str) -> list[str]:
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path!r} does not exist")
    return Path(path).read_text(encoding="utf-8").splitlines()


def _sources(texts: list[str], input: str | None, stdin: TextIO) -> list[str]:
    sources = read_lines(input, "--input") if input else texts or stdin.read().splitlines()
    if not sources:
        raise ValueError(
            "nothing to translate: give texts, --input FILE (one per line) or lines on stdin"
        )
    return sources


def _references(path: str, sources: list[str]) -> list[str]:
    refs = read_lines(path, "--reference")
    if len(refs) != len(sources):
        raise ValueError(
            f"{len(sources)} source lines but {len(refs)} reference lines in {path}: "
            "the files must be line-aligned"
        )
    return refs


def translate_lines(
    model_dir: str | Path,
    cfg: TranslateConfig,
    sample: SampleConfig,
    *,
    texts: Sequence[str] = (),
    input: str | None = None,
    reference: str | None = None,
    progress: bool = True,
    stdin: TextIO = sys.stdin,
) -> Translations:
    """Translate `texts`, or the lines of `input`, or of stdin; beam search, or sampling when
    sample.temperature > 0 (with beam 1). With `reference`, also score BLEU and chrF."""
    model = load_model(model_dir)
    if model.cfg.arch != "encdec":
        raise ValueError(
            f"{model_dir} is a {model.cfg.arch} model; translate needs an encoder-decoder "
            "(train one with `zerolm pretrain --model.arch=encdec`)"
        )
    sources = _sources(list(texts), input, stdin)
    refs = _references(reference, sources) if reference else None
    if sample.temperature > 0 and cfg.beam > 1:
        raise ValueError("--temperature > 0 samples one translation: use it with --beam 1")
    hyps = translate_texts(
        model,
        Tokenizer.load(model_dir),
        sources,
        beam=cfg.beam,
        length_penalty=cfg.length_penalty,
        max_new_tokens=sample.max_new_tokens or None,
        sampling=sampling_params(sample) if sample.temperature > 0 else None,
        seed=sample.seed,
        batch_size=cfg.batch_size,
        progress=progress and len(sources) > cfg.batch_size,
        too_long=cfg.too_long,
    )
    scores = None
    if refs is not None:
        got, copy = score(hyps, refs), score(sources, refs)
        scores = {"pairs": len(sources), **got, **{f"copy_{k}": v for k, v in copy.items()}}
    return Translations(sources, hyps, scores)
