"""Training the three tokenizer kinds from an iterator of documents.

- bpe: byte-level BPE (GPT-2/LLaMA style). The pre-tokenizer is `cfg.pre` (tokenizer/pretok.py:
  llama.cpp's qwen2 or deepseek-llm, so a GGUF export tokenizes identically, or zerolm's older
  Han-isolating one); byte-level coding makes any Unicode string round-trip exactly.
- wordpiece: BERT-style, with BERT normalisation (optionally lowercased) and single digits.
- char: one token per character seen in training, most frequent first, with byte fallback
  (<0x00>..<0xFF>) for unseen characters, so it too round-trips any string.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from zerolm.config import TokenizerConfig
from zerolm.tokenizer.pretok import TRAIN_PRE, pre_tokenizer
from zerolm.tokenizer.specials import BYTE_TOKENS, CLS, SEP, SPECIAL_TOKENS, UNK
from zerolm.tokenizer.tokenizer import Tokenizer, chunks


def min_vocab_size(kind: str) -> int:
    """Smallest vocabulary that holds the specials plus the base alphabet."""
    base = {"bpe": 256, "char": 256, "wordpiece": 1}[kind]
    return len(SPECIAL_TOKENS) + base


def check_config(cfg: TokenizerConfig) -> None:
    """Raise ValueError before any work if `cfg` cannot produce a tokenizer."""
    need = min_vocab_size(cfg.kind)
    if not cfg.path and cfg.vocab_size < need:
        raise ValueError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for a {cfg.kind} tokenizer: it "
            f"needs at least {need} ({len(SPECIAL_TOKENS)} special tokens + the base alphabet); "
            "try --tokenizer.vocab_size=8192"
        )


def train_tokenizer(
    cfg: TokenizerConfig, docs: Iterable[str], length: int | None = None, progress: bool = True
) -> Tokenizer:
    """Train a tokenizer of `cfg.kind` on `docs` (an iterator of strings; streamed, not held)."""
    check_config(cfg)
    build = {"bpe": _train_bpe, "wordpiece": _train_wordpiece, "char": _train_char}[cfg.kind]
    tok = build(cfg, (c for d in docs for c in chunks(d)), None, progress)
    return Tokenizer(tok)


def _train_bpe(cfg, docs: Iterator[str], length, progress) -> _HFTokenizer:
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer(TRAIN_PRE[cfg.pre])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(docs, trainer, length=length)
    return tok


def _train_wordpiece(cfg, docs: Iterator[str], length, progress) -> _HFTokenizer:
    tok = _HFTokenizer(models.WordPiece(unk_token=UNK))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=cfg.lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=progress,
    )
    tok.train_from_iterator(docs, trainer, length=length)
    cls_id, sep_id = SPECIAL_TOKENS.index(CLS), SPECIAL_TOKENS.index(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )
    return tok


def _train_char(cfg, docs: Iterator[str], length, progress) -> _HFTokenizer:
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(doc)
    fixed = list(SPECIAL_TOKENS) + list(BYTE_TOKENS)
    room = cfg.vocab_size - len(fixed)
    chars = [
        c
        for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if n >= cfg.min_frequency
    ]
    chars = [c for c in chars if c not in fixed][:room]
    vocab = {t: i for i, t in enumerate(fixed + chars)}
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok
