"""Tokenizers: the `Tokenizer` class (tokenizer.py), the reserved special tokens (specials.py),
training (train.py), the chat template (chat.py), streaming decode and compression reports."""

from zerolm.tokenizer.specials import (
    ASSISTANT,
    BERT_SPECIALS,
    BOS,
    CLS,
    END,
    EOS,
    MASK,
    PAD,
    SEP,
    SPECIAL_TOKENS,
    SYSTEM,
    UNK,
    USER,
)
from zerolm.tokenizer.tokenizer import Tokenizer, check_tokenizers

__all__ = [
    "ASSISTANT",
    "BERT_SPECIALS",
    "BOS",
    "CLS",
    "END",
    "EOS",
    "MASK",
    "PAD",
    "SEP",
    "SPECIAL_TOKENS",
    "SYSTEM",
    "UNK",
    "USER",
    "Tokenizer",
    "check_tokenizers",
]
