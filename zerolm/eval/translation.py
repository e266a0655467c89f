"""Translating texts with an encoder-decoder model, and scoring translations with sacrebleu.

Scores are corpus BLEU (sacrebleu's default 13a tokenisation) and chrF, each next to the
copy-the-source baseline on the same references: for a same-language task (archaic -> modern
English) copying already scores high, and a model is only useful above it.
"""

from __future__ import annotations

import logging

import sacrebleu
import torch
from tqdm import tqdm

from zerolm.eval.mode import eval_mode
from zerolm.infer.seq2seq import generate
from zerolm.model.encdec import EncoderDecoder
from zerolm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def encode_source(tok: Tokenizer, text: str) -> list[int]:
    """A source sentence as the encoder reads it: its tokens and an end-of-sequence token."""
    return [*tok.encode(text), tok.eos_id]


@torch.no_grad()
def translate_texts(
    model: EncoderDecoder,
    tok: Tokenizer,
    texts: list[str],
    *,
    beam: int = 4,
    length_penalty: float = 1.0,
    max_new_tokens: int | None = None,
    sampling=None,
    seed: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
    too_long: str = "error",
) -> list[str]:
    """Translate each text; batches are formed from texts of similar length, output keeps the input
    order. A source longer than the encoder window is an error (too_long="error") or is cut to the
    window with a warning ("truncate")."""
    window = model.cfg.max_seq_len
    sources = []
    for i, text in enumerate(texts):
        ids = encode_source(tok, text)
        if len(ids) > window:
            if too_long == "error":
                raise ValueError(
                    f"text {i + 1} ({text[:40]!r}...) is {len(ids)} tokens, more than the encoder "
                    f"window of {window}: split it into shorter sentences"
                )
            log.warning(
                "text %d is %d tokens: keeping its first %d (the encoder window)",
                i + 1,
                len(ids),
                window,
            )
            ids = [*ids[: window - 1], tok.eos_id]
        sources.append(ids)
    room = window - 1  # the decoder's positions: the start token, then the output
    max_new = min(max_new_tokens or room, room)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    bos, eos = tok.bos_id, tok.eos_id
    if bos is None:
        raise ValueError("translation needs a tokenizer with a bos token (the decoder's start)")
    bar = tqdm(total=len(order), desc="translate", unit="text", disable=not progress)
    with eval_mode(model), bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            outs = generate(
                model,
                [sources[i] for i in idx],
                bos=bos,
                eos=eos,
                max_new_tokens=max_new,
                beam=beam,
                length_penalty=length_penalty,
                sampling=sampling,
                seed=seed,
            )
            for i, ids in zip(idx, outs):
                out[i] = tok.decode([t for t in ids if t != eos], skip_special=True).strip()
            bar.update(len(idx))
    return out


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF of the hypotheses against one reference each."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} translations but {len(references)} references: they must be "
            "line-aligned"
        )
    if not references:
        raise ValueError("no references to score against")
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def evaluate_translation(
    model: EncoderDecoder, tok: Tokenizer, sources: list[str], references: list[str], **kw
) -> dict:
    """BLEU / chrF of the model's translations and of copying the source, on the same references."""
    hyps = translate_texts(model, tok, sources, **kw)
    model_scores, copy_scores = score(hyps, references), score(sources, references)
    return {
        "pairs": len(sources),
        **model_scores,
        **{f"copy_{k}": v for k, v in copy_scores.items()},
        "translations": hyps,
    }
