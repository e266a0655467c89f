"""The special tokens every zerolm tokenizer reserves at ids 0..15 (documents, chat roles, BERT,
spares), and the byte-fallback tokens of the `char` kind."""

from __future__ import annotations

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD,
    BOS,
    EOS,
    UNK,
    SYSTEM,
    USER,
    ASSISTANT,
    END,
    CLS,
    SEP,
    MASK,
    *(f"<|reserved_{i}|>" for i in range(5)),
)  # ids 0..15, in this order, in every tokenizer
# a foreign BERT vocabulary's names for zerolm's specials (token_id(PAD) finds [PAD]); no
# bos/eos/chat roles
BERT_SPECIALS = {PAD: "[PAD]", UNK: "[UNK]", CLS: CLS, SEP: SEP, MASK: MASK}

BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # `char`: a byte it has no character for
