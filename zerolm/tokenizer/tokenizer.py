"""Tokenizers on the HF `tokenizers` engine, behind one small zerolm interface.

Every zerolm tokenizer reserves the same special tokens at ids 0..15 (documents, chat roles,
BERT, spares), so later stages never resize the vocabulary, and saves as a standard
`tokenizer.json` + `tokenizer_config.json` that `transformers.PreTrainedTokenizerFast` loads.
An imported BERT checkpoint's WordPiece tokenizer ([PAD] [UNK] [CLS] [SEP] [MASK] wherever its
vocabulary puts them) loads as a foreign tokenizer: its specials are found by name.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from zerolm.files import atomic_write_bytes, atomic_write_text
from zerolm.tokenizer.chat import CHAT_TEMPLATE
from zerolm.tokenizer.hf_files import (
    Roles,
    read_control_tokens,
    read_files,
    read_names,
    read_roles,
    read_template,
)
from zerolm.tokenizer.pieces import kind_of, token_bytes_of
from zerolm.tokenizer.specials import (
    BERT_SPECIALS,
    BOS,
    BYTE_TOKENS,
    CLS,
    END,
    EOS,
    MASK,
    PAD,
    SEP,
    SPECIAL_TOKENS,
    UNK,
)
from zerolm.tokenizer.template import ChatTemplate

# Places where every TRAIN_PRE pattern (tokenizer/pretok.py) starts a new pre-token: after a line
# break before a non-space, before a single space that begins " word" after a letter, digit or Han
# character (deepseek-llm leaves a space after what none of its regexes match, e.g. an emoji).
_CUT = re.compile(r"(?<=\n)(?=\S)|(?<=[A-Za-z0-9\u4e00-\u9fa5])(?= \S)")


def chunks(text: str, size: int = 1 << 13) -> Iterator[str]:
    """Cut a long document into pieces of about `size` characters at pre-token boundaries, so
    training statistics are unchanged. The trainer buffers ~1000 items, so this bounds its
    memory however long the documents are."""
    start = 0
    while len(text) - start > size:
        m = _CUT.search(text, start + size)
        if m is None or m.start() >= len(text):
            break
        yield text[start : m.start()]
        start = m.start()
    if start < len(text):
        yield text[start:]


class Tokenizer:
    """A trained tokenizer: text <-> ids. Wraps a `tokenizers.Tokenizer`.

    Its layout is one of: "zerolm" (SPECIAL_TOKENS at ids 0..15, zerolm's chat template), "bert"
    (a foreign WordPiece vocabulary, BERT_SPECIALS found by name) or "hf" (a foreign decoder's
    tokenizer directory: special tokens by role from its config files, its own Jinja chat
    template). Code outside this package asks for ids by role (bos_id, eos_id, stop_ids, ...),
    never by number or by zerolm's token strings."""

    def __init__(self, hf: _HFTokenizer, layout: str = "zerolm", source: Path | None = None):
        """layout: see the class docstring; "hf" reads its roles and template from the directory
        `source`. A foreign file's own truncation and padding are switched off, so encode()
        returns exactly the text's ids as for zerolm's own."""
        self.hf, self.layout = hf, layout
        self.aliases: dict[str, str] = {}  # zerolm special -> its name in a BERT vocabulary
        self.files: dict[str, bytes] = {}  # "hf": the source's tokenizer files, saved unchanged
        self.template: ChatTemplate | None = None  # "hf": the model's own chat template
        self.token_names: dict[str, str] = {}  # "hf": {"bos_token": ...} as its files say
        if layout == "zerolm":
            for i, tok in enumerate(SPECIAL_TOKENS):
                if hf.token_to_id(tok) != i:
                    raise ValueError(
                        f"tokenizer does not reserve {tok!r} at id {i}; train it with `zerolm "
                        "tokenizer train`"
                    )
            self.roles = Roles(bos=1, eos=(2,), pad=0, unk=3)  # SPECIAL_TOKENS' order
            return
        hf.no_truncation()
        hf.no_padding()
        if layout == "bert":
            if missing := [t for t in BERT_SPECIALS.values() if hf.token_to_id(t) is None]:
                raise ValueError(
                    f"not a BERT tokenizer: {', '.join(missing)} missing from its vocabulary"
                )
            self.aliases = {k: v for k, v in BERT_SPECIALS.items() if k != v}
            self.roles = Roles(bos=None, eos=(), pad=self.token_id(PAD), unk=self.token_id(UNK))
            return
        if layout != "hf" or source is None:
            raise ValueError(f"unknown tokenizer layout {layout!r} (or no source directory)")
        self.roles = read_roles(hf, source)
        self.token_names = read_names(source)
        self.files = read_files(source)
        if (text := read_template(source)) is not None:
            control = read_control_tokens(source)
            self.template = ChatTemplate(text, self, str(source), control)

    # -------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """Ids of `text` exactly as written (no added bos/eos/CLS)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], split_special: bool = True) -> list[list[int]]:
        """Like encode, in parallel across cores (Rust threads). split_special=False encodes text
        that spells a special token ("<|end|>") as ordinary characters (for untrusted content)."""
        hf = self.hf if split_special else self._plain
        return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]

    def completion_ids(self, texts: list[str]) -> list[list[int]]:
        """Ids of completion prompts, as a document starts in training: zerolm's own put eos first
        (documents are separated by eos); a foreign one adds what its post-processor adds
        (bos, for most), as transformers' `tokenizer(text)` does."""
        if self.layout == "zerolm":
            return [[self.eos_id, *ids] for ids in self.encode_batch(texts)]
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=True)]

    @cached_property
    def _plain(self) -> _HFTokenizer:
        """A copy that never matches special tokens in text (a separate object: thread-safe)."""
        hf = _HFTokenizer.from_str(self.hf.to_str())
        hf.encode_special_tokens = True
        return hf

    def encode_stream(
        self, texts: Iterable[str], max_docs: int = 1024, max_chars: int = 1 << 18
    ) -> Iterator[tuple[str, np.ndarray]]:
        """(text, ids) for each text, encoded in parallel batches of bounded size: memory stays
        flat however long the stream (an Encoding costs ~110 bytes per token). A long text is
        encoded in pieces cut where a pre-token always starts (`chunks`: the same ids),
        so one huge document costs 4 bytes per token (ids are int32 arrays), not an Encoding's 110.
        Only a run of over 4 * max_chars / 8 characters without such a place is cut inside."""
        queue: deque = deque()  # [text, ids per encoded piece, all pieces batched], in input order
        batch: list[tuple[list, str]] = []  # (queue entry, piece)

        def flush():
            for (entry, _), ids in zip(batch, self.encode_batch([p for _, p in batch])):
                entry[1].append(np.array(ids, dtype=np.int32))
            batch.clear()

        def ready(entry) -> bool:  # every piece batched, and none still waiting in `batch`
            return entry[2] and not (batch and batch[0][0] is entry)

        chars, size = 0, max(max_chars // 8, 1)
        for text in texts:
            queue.append(entry := [text, [], False])
            for long in chunks(text, size):
                for i in range(
                    0, len(long), 4 * size
                ):  # a run with no pre-token start (1 M spaces) is
                    piece = long[i : i + 4 * size]  # cut anyway: its ids may differ at the cut
                    batch.append((entry, piece))
                    chars += len(piece)
                    if len(batch) >= max_docs or chars >= max_chars:
                        flush()
                        chars = 0
            entry[2] = True
            while queue and ready(queue[0]):
                done, parts, _ = queue.popleft()
                yield done, np.concatenate(parts) if parts else np.zeros(0, np.int32)
        flush()
        for done, parts, _ in queue:
            yield done, np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=skip_special)

    # -------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def foreign(self) -> bool:
        """A foreign tokenizer (BERT's or an HF decoder's) rather than one zerolm trained."""
        return self.layout != "zerolm"

    # -------------------------------------------------------------- special tokens by role
    @property
    def bos_id(self) -> int | None:
        return self.roles.bos

    @property
    def eos_id(self) -> int:
        """The token that ends a document (and starts the next one in a token stream)."""
        if not self.roles.eos:
            raise ValueError("this tokenizer has no eos token (a BERT vocabulary)")
        return self.roles.eos[0]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation (an HF generation_config may list several)."""
        return self.roles.eos

    @property
    def pad_id(self) -> int:
        """The id padding positions hold (never attended or learned): the pad token, else eos."""
        return self.roles.pad if self.roles.pad is not None else self.eos_id

    @property
    def unk_id(self) -> int | None:
        return self.roles.unk

    @property
    def turn_end(self) -> int | None:
        """The chat template's end-of-turn token: zerolm's <|end|>, a foreign template's own."""
        if self.layout == "zerolm":
            return SPECIAL_TOKENS.index(END)
        return None if self.template is None else self.template.turn_end

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Where a chat reply ends: the template's end-of-turn token, then every eos."""
        turn = () if self.turn_end is None else (self.turn_end,)
        return tuple(dict.fromkeys((*turn, *self.roles.eos)))

    # BERT's input roles, by name: zerolm's own reserve them, a BERT vocabulary has its own ids
    @property
    def cls_id(self) -> int:
        return self.token_id(CLS)

    @property
    def sep_id(self) -> int:
        return self.token_id(SEP)

    @property
    def mask_id(self) -> int:
        return self.token_id(MASK)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens: never text, never split from text, b"" in token_bytes."""
        if self.layout == "zerolm":
            return frozenset(range(len(SPECIAL_TOKENS)))
        if self.layout == "bert":
            return frozenset(self.token_id(t) for t in BERT_SPECIALS)
        added = self.hf.get_added_tokens_decoder()
        return frozenset(i for i, t in added.items() if t.special)

    def special_tokens(self, turn_end: bool = True) -> dict[str, str]:
        """Role -> token string: bos, eos, pad, unk (and turn_end) where the tokenizer has them."""
        r = self.roles
        ids = {"bos": r.bos, "eos": r.eos[0] if r.eos else None, "pad": r.pad, "unk": r.unk}
        if turn_end:
            ids["turn_end"] = self.turn_end
        return {role: str(self.hf.id_to_token(i)) for role, i in ids.items() if i is not None}

    def token_str(self, i: int) -> str:
        """How a token id reads in a view of tokens: a special token's own name, else its text
        (bytes that are not UTF-8 on their own escaped)."""
        if i in self.special_ids:
            return str(self.hf.id_to_token(i))
        return self.token_bytes[i].decode("utf-8", "backslashreplace")

    def token_id(self, token: str) -> int:
        i = self.hf.token_to_id(self.aliases.get(token, token))
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each token id stands for (b"" for special tokens): a token may be part
        of a character (byte-level BPE, byte fallback), so bytes, not text, are exact. An added
        non-special token ("<think>", a word added by `tokenizer extend`) is its own text."""
        return token_bytes_of(self.hf, self.kind, self.special_ids)

    def token_byte_lengths(self):
        """(V,) int64 numpy array: UTF-8 bytes each token stands for (0 for special tokens), so
        bits per byte = total nats / ln 2 / sum of byte lengths of the predicted tokens."""
        return np.array([len(b) for b in self.token_bytes], dtype=np.int64)

    def unknown_ids(self) -> set[int]:
        """Ids that stand for text unseen in training: the unk token, and byte fallbacks of
        `char`."""
        out = set() if self.unk_id is None else {self.unk_id}
        if self.kind in ("char", "spm"):
            out |= {i for t in BYTE_TOKENS if (i := self.hf.token_to_id(t)) is not None}
        return out

    @cached_property  # the wrapped tokenizer never changes: serialise it once, not per call
    def kind(self) -> str:
        """wordpiece; bpe (byte-level: GPT-2's byte alphabet); spm (SentencePiece style: "▁" for
        space, <0xNN> byte fallback, BPE or Unigram: Llama 2, Mistral v1, Phi-3); char (zerolm's
        byte-fallback BPE over characters, no "▁"; any other vocabulary of plain text pieces)."""
        return kind_of(json.loads(self.hf.to_str()))

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    # -------------------------------------------------------------- files
    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json (the transformers layout) into out_dir; a
        foreign decoder's tokenizer writes its source files back unchanged."""
        out = Path(out_dir)
        if self.layout == "hf":
            for name, data in self.files.items():
                atomic_write_bytes(out / name, data)
            return out / "tokenizer.json"
        atomic_write_text(out / "tokenizer.json", self.hf.to_str(pretty=True))
        specials = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
        if self.kind == "wordpiece":
            specials.update(cls_token=CLS, sep_token=SEP, mask_token=MASK)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "chat_template": CHAT_TEMPLATE,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in specials.values()],
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.layout == "bert":  # a BERT vocabulary: its own special names, no chat roles
            names = zip(
                ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
                BERT_SPECIALS.values(),
            )
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **dict(names),
                "clean_up_tokenization_spaces": False,
                "model_max_length": 1_000_000_000,
            }
        atomic_write_text(
            out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False)
        )
        return out / "tokenizer.json"

    @classmethod
    def load(cls, path: str | Path, layout: str | None = None) -> Tokenizer:
        """Load from a tokenizer.json file or a directory holding one. layout=None: zerolm's own
        if the file reserves its specials, a BERT vocabulary if it holds BERT's, else a foreign
        decoder's tokenizer directory (see __init__)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ValueError(
                f"no tokenizer at {str(path)!r}: expected tokenizer.json or a directory holding one"
            )
        try:
            hf = _HFTokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            raise ValueError(f"{p}: not a valid tokenizer.json ({e})") from None
        if layout is None:
            layout = (
                "zerolm"
                if hf.token_to_id(SPECIAL_TOKENS[0]) == 0
                else "bert"
                if all(hf.token_to_id(t) is not None for t in BERT_SPECIALS.values())
                else "hf"
            )
        return cls(hf, layout, p.parent)


def check_tokenizers(policy_dir: str | Path, other_dir: str | Path, role: str) -> None:
    """A reference or reward model must read the same token ids as the policy: the same
    tokenizer.json (vocabulary, merges, added tokens, normalizer...; sha256 of its canonical
    form). An "hf" layout's roles and chat template are not part of it: the policy renders every
    conversation with its own template and roles and the other model only scores those ids, so
    a model with the same vocabulary and another template is fine."""
    a, b = Tokenizer.load(policy_dir), Tokenizer.load(other_dir)
    if a.sha256 != b.sha256:
        raise ValueError(
            f"the {role} {other_dir} has a different tokenizer than the policy {policy_dir} "
            f"(vocab {b.vocab_size} vs {a.vocab_size}; sha256 {b.sha256[:12]} vs {a.sha256[:12]}): "
            f"use a {role} fine-tuned from the same base model"
        )
