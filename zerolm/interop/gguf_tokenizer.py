"""A GGUF file's tokenizer (tokenizer.ggml.* metadata) <-> an HF tokenizer.json directory, exact as
llama.cpp tokenizes (src/llama-vocab.cpp).

- "gpt2" (byte-level BPE): tokens and merges as written; `tokenizer.ggml.pre` names the splitting
  (zerolm/tokenizer/pretok.py holds what each name's HF tokenizer.json has).
- "llama" (SentencePiece BPE): merges recovered from the scores as transformers' GGUF reader does,
  byte fallback, "▁" for space and a "▁" prefix per tokenizer.ggml.add_space_prefix.
- "bert" (WordPiece): the GGUF's "▁x" / "x" pieces back to HF's "x" / "##x", BERT normalisation.
- token types 3 (CONTROL) and 4 (USER_DEFINED) are added tokens, special for control: llama.cpp
  matches them in the text before splitting (control ones only when it parses special tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zerolm.files import atomic_write_text
from zerolm.tokenizer.chat import CHAT_TEMPLATE
from zerolm.tokenizer.pieces import byte_level_alphabet
from zerolm.tokenizer.pretok import NOT_EXACT, PRE, TRAIN_PRE, normalise, pre_name_of
from zerolm.tokenizer.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama_token_type
MODELS = ("gpt2", "llama", "bert")  # tokenizer.ggml.model values this module reads
ROLE_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's key
    "cls_token": "tokenizer.ggml.cls_token_id",
    "mask_token": "tokenizer.ggml.mask_token_id",
}
# llama.cpp adds bos by default (no tokenizer.ggml.add_bos_token) for these pre names and "llama"
_BOS_BY_DEFAULT = {"llama3", "llama-v3", "llama-bpe", "tekken", "chameleon"}


def _supported() -> str:
    return f"tokenizer.ggml.model {', '.join(MODELS)}; pre (for gpt2) {', '.join(PRE)}"


def tokenizer_files_from_gguf(meta: dict[str, Any], out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ generation_config.json) into out_dir, so
    `Tokenizer.load(out_dir)` is the GGUF's tokenizer. meta: gguf_file.fields(open_gguf(path)).
    ValueError naming an unsupported tokenizer model or pre-tokenizer (before writing anything)."""
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("the GGUF has no tokenizer.ggml.tokens: it carries no tokenizer")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    spec, add_bos = _model_json(meta, tokens, types)
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    roles = {r: tokens[i] for r, k in ROLE_KEYS.items() if (i := meta.get(k)) is not None}
    spec["added_tokens"] = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": ty == CONTROL,
        }
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty in (CONTROL, USER_DEFINED)
    ]
    spec.setdefault("post_processor", _post_processor(roles, tokens, meta, add_bos, add_eos))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **roles,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    if isinstance(template := meta.get("tokenizer.chat_template"), str) and template:
        config["chat_template"] = template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", json.dumps(spec, ensure_ascii=False))
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, ensure_ascii=False))
    gen = {k[len("tokenizer.ggml.") :]: meta[k] for k in _GEN_KEYS if k in meta}
    if "eot_token_id" in gen:  # llama.cpp ends a generation at eot as at eos
        ends = [gen.get("eos_token_id"), gen.pop("eot_token_id")]
        gen["eos_token_id"] = list(dict.fromkeys(i for i in ends if i is not None))
    if gen:
        atomic_write_text(out / "generation_config.json", json.dumps(gen))


def _model_json(meta: dict, tokens: list[str], types: list[int]) -> tuple[dict, bool]:
    """(tokenizer.json without added tokens, whether llama.cpp adds bos) by tokenizer model."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre")
        if pre not in PRE:
            raise ValueError(
                f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}: zerolm reads "
                f"{_supported()}"
            )
        add_bos = meta.get("tokenizer.ggml.add_bos_token", pre in _BOS_BY_DEFAULT)
        return _byte_level_json(meta, tokens, types, pre), bool(add_bos)
    if model == "llama":
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)
        return _sentencepiece_json(meta, tokens), bool(add_bos)
    if model == "bert":  # [CLS] .. [SEP]: its own post-processor
        return _wordpiece_json(meta, tokens), False
    raise ValueError(
        f"unsupported GGUF tokenizer tokenizer.ggml.model={model!r}: zerolm reads {_supported()}"
    )


_GEN_KEYS = (
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.eot_token_id",
)


def _post_processor(roles: dict, tokens: list[str], meta: dict, bos: bool, eos: bool) -> dict:
    """What llama.cpp adds with add_special: bos first, eos last, as the file says."""
    single: list[dict] = [{"Sequence": {"id": "A", "type_id": 0}}]
    special = {}
    for role, on, at in (("bos_token", bos, 0), ("eos_token", eos, len(single) + 1)):
        if on and role in roles:
            single.insert(at, {"SpecialToken": {"id": roles[role], "type_id": 0}})
            i = meta[ROLE_KEYS[role]]
            special[roles[role]] = {"id": roles[role], "ids": [i], "tokens": [tokens[i]]}
    return {
        "type": "TemplateProcessing",
        "single": single,
        "pair": single,
        "special_tokens": special,
    }


def _bpe_model(vocab: dict, merges: list, **kw) -> dict:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": merges,
        **kw,
    }


def _byte_level_json(meta: dict, tokens: list[str], types: list[int], pre: str) -> dict:
    """tokenizer.json of a byte-level BPE: a normal token written as plain text (command-r's
    "\u200d") is spelled in the byte alphabet, as transformers' GGUF reader does."""
    spelling = byte_level_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        # an added token keeps its text as key (HF finds its id there); a later token wins a clash
        plain = set(t) <= alphabet or ty in (CONTROL, USER_DEFINED)
        vocab[t if plain else "".join(spelling[b] for b in t.encode("utf-8"))] = i
    merges = [_merge(m) for m in meta.get("tokenizer.ggml.merges") or []]
    family = PRE[pre]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "normalizer": family.normalizer,
        "pre_tokenizer": family.pre_tokenizer,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": _bpe_model(vocab, merges, ignore_merges=family.ignore_merges),
    }


def _wordpiece_json(meta: dict, tokens: list[str]) -> dict:
    """tokenizer.json of a BERT WordPiece: the GGUF writes a word-start piece "▁x" (HF "x") and a
    continuation as "x" (HF "##x"); [CLS]-style names stay."""
    vocab = {
        t[1:] if t.startswith("\u2581") else t if t[:1] + t[-1:] == "[]" else "##" + t: i
        for i, t in enumerate(tokens)
    }
    lower = bool(meta.get("tokenizer.ggml.normalizer.lowercase", True))
    cls, sep = (tokens[meta[k]] for k in (ROLE_KEYS["cls_token"], ROLE_KEYS["sep_token"]))
    ids = {t: vocab[t] for t in (cls, sep)}
    single = [{"SpecialToken": {"id": cls, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    single.append({"SpecialToken": {"id": sep, "type_id": 0}})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "normalizer": {
            "type": "BertNormalizer",
            "clean_text": True,
            "handle_chinese_chars": True,
            "strip_accents": None,
            "lowercase": lower,
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": single,
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in ids.items()},
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {
            "type": "WordPiece",
            "unk_token": tokens[meta[ROLE_KEYS["unk_token"]]],
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": vocab,
        },
    }


def _merge(m: str) -> list[str]:
    at = m.find(" ", 1)  # as llama.cpp splits "a b": at the first space after the first char
    return [m[:at], m[at + 1 :]]


def _sentencepiece_json(meta: dict, tokens: list[str]) -> dict:
    """tokenizer.json of a SentencePiece BPE (Llama 2, Phi-3): "▁" for space, a "▁" prefix on
    every text run (llama.cpp: at the start and after each special token), <0xNN> fallback."""
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    norm = [{"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
    if prefix:
        norm.insert(0, {"type": "Prepend", "prepend": "\u2581"})
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    decode = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        decode.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "normalizer": {"type": "Sequence", "normalizers": norm},
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": decode},
        "model": _bpe_model(
            vocab,
            merges,
            unk_token=None if unk is None else tokens[unk],
            fuse_unk=True,
            byte_fallback=True,
        ),
    }


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[list[str]]:
    """Every split of a token into two tokens is a merge, ranked by the token's score (best
    first; ties: longer left, then longer right), as transformers' generate_merges."""
    merges = []
    for token, score in scores.items():
        local = [
            (token[:k], token[k:], score)
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [[a, b] for a, b, _ in merges]


def write_tokenizer(writer, tok: Tokenizer) -> None:
    """Write `tok` as tokenizer.ggml.* metadata + tokenizer.chat_template into a
    `gguf.GGUFWriter`. ValueError if llama.cpp would not tokenize exactly as `tok` does."""
    spec = json.loads(tok.hf.to_str())
    model = spec["model"]
    if tok.kind != "bpe" or model["type"] != "BPE":
        raise ValueError(
            f"cannot export a {tok.kind} tokenizer ({model['type']}) to GGUF: zerolm writes "
            "byte-level BPE tokenizers only (tokenizer.ggml.model gpt2)"
        )
    pre = _export_pre(spec)
    if tok.layout == "zerolm" and pre in NOT_EXACT:
        raise ValueError(
            f"cannot export to GGUF: llama.cpp's {pre} pre-tokenizer is not exact "
            f"({NOT_EXACT[pre]}); retrain the tokenizer with --tokenizer.pre=qwen2"
        )
    tokens, types = _tokens(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    bos, add_bos, add_eos = llama_cpp_adds(tok)
    template = CHAT_TEMPLATE if tok.layout == "zerolm" else getattr(tok.template, "source", None)
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_eos_token_id(tok.eos_id)
    if tok.turn_end is not None and tok.turn_end != tok.eos_id:
        writer.add_eot_token_id(tok.turn_end)  # llama.cpp's chat stops at end-of-generation ids
    if tok.unk_id is not None:
        writer.add_unk_token_id(tok.unk_id)
    if tok.roles.pad is not None:
        writer.add_pad_token_id(tok.roles.pad)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if template:
        writer.add_chat_template(template)


def llama_cpp_adds(tok: Tokenizer) -> tuple[int | None, bool, bool]:
    """(bos id, add_bos, add_eos) as the exported GGUF says: what llama.cpp (and Ollama) put
    around every text they tokenize with specials, chat prompts included.

    A zerolm tokenizer starts a document with eos (completion_ids) but a conversation with
    <|bos|> (its chat template). llama.cpp can add only one fixed bos to both, so it adds none:
    its bos is <|bos|>, which the chat template writes, so llama-cli's and Ollama's chat prompts
    are zerolm's exactly; to continue a text as `zerolm generate` does, start it with <|eos|>."""
    if tok.layout == "zerolm":
        return tok.bos_id, False, False
    return _added_specials(tok)


def _export_pre(spec: dict) -> str:
    """The llama.cpp pre name that splits as `spec` does, or ValueError why there is none. Of
    names with the same splitting, the one whose family has `spec`'s normalizer (llama.cpp itself
    applies none: a foreign NFC tokenizer is written as llama.cpp's converter writes it)."""
    first = pre_name_of(spec.get("pre_tokenizer"))
    if first is None:
        old = normalise(spec.get("pre_tokenizer")) == normalise(TRAIN_PRE["zerolm-han"])
        what = "zerolm's older Han-isolating pre-tokenizer" if old else "this pre-tokenizer"
        raise ValueError(
            f"cannot export to GGUF: llama.cpp implements no pre-tokenizer that splits text as "
            f"{what} does, so it would tokenize differently; retrain the tokenizer with "
            "--tokenizer.pre=qwen2"
        )
    norm, split = spec.get("normalizer"), normalise(PRE[first].pre_tokenizer)
    same = [n for n, p in PRE.items() if normalise(p.pre_tokenizer) == split]
    pre = next((n for n in same if PRE[n].normalizer == norm), first if norm is None else None)
    if pre is None:
        raise ValueError(
            f"cannot export to GGUF: the tokenizer normalises text ({norm}), which llama.cpp's "
            f"{first} pre-tokenizer does not; use a tokenizer without a normalizer"
        )
    family, model = PRE[pre], spec["model"]
    if bool(model.get("ignore_merges")) != family.ignore_merges or model.get("byte_fallback"):
        raise ValueError(
            f"cannot export to GGUF: the BPE model's ignore_merges/byte_fallback differ from what "
            f"llama.cpp does for {pre!r}, so it would tokenize differently"
        )
    return pre


def _tokens(tok: Tokenizer) -> tuple[list[str], list[int]]:
    """Token strings by id (added tokens as their text) and their llama.cpp types."""
    added = tok.hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(tok.vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(CONTROL if added[i].special else USER_DEFINED)
            continue
        t = tok.hf.id_to_token(i)
        if t is None:
            raise ValueError(f"the tokenizer has no token at id {i}: a GGUF vocabulary has no gaps")
        tokens.append(t)
        types.append(NORMAL)
    return tokens, types


def _added_specials(tok: Tokenizer) -> tuple[int | None, bool, bool]:
    """(bos id, add_bos, add_eos): what tok.completion_ids adds around the text."""
    plain = tok.encode("a")
    full = tok.completion_ids(["a"])[0]
    at = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
    head, tail = full[:at], full[at + len(plain) :]
    if head not in ([], [tok.bos_id]) or tail not in ([], [tok.eos_id]):
        raise ValueError(
            f"cannot export to GGUF: the tokenizer adds {head} before and {tail} after a text, "
            "but llama.cpp can add only its bos before and its eos after"
        )
    return tok.bos_id, bool(head), bool(tail)
