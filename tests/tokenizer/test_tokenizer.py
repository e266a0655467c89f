import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerolm.config import TokenizerConfig
from zerolm.tokenizer import SPECIAL_TOKENS, Tokenizer
from zerolm.tokenizer.pretok import ZEROLM_HAN
from zerolm.tokenizer.train import train_tokenizer

TRAIN = [
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "The year 1623 saw the First Folio printed; it's 36 plays in 907 pages.",
] * 20


@pytest.fixture(scope="module", params=["bpe", "char", "wordpiece"])
def trained(request, tmp_path_factory, tiny_tokenizer):
    tok = tiny_tokenizer(request.param, TRAIN, vocab_size=600)
    path = tmp_path_factory.mktemp(request.param)
    tok.save(path)
    return request.param, tok, path


@pytest.fixture(scope="module")
def roundtrip_tokenizers(tiny_tokenizer):
    return {k: tiny_tokenizer(k, TRAIN, vocab_size=600) for k in ("bpe", "char")}


def test_special_tokens_reserved_first(trained):
    kind, tok, path = trained
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_id(t) == i
        assert tok.encode(t) == [i]
    assert tok.kind == kind
    assert Tokenizer.load(path).sha256 == tok.sha256


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_any_unicode_round_trips(roundtrip_tokenizers, text):
    for kind, tok in roundtrip_tokenizers.items():
        ids = tok.encode(text)
        assert tok.decode(ids) == text, kind
        plain = tok.encode_batch([text], split_special=False)[
            0
        ]  # typed special-token strings as text
        assert b"".join(tok.token_bytes[i] for i in plain) == text.encode("utf-8"), (
            kind
        )  # exact, even mid-character


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(
        alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=50
    )
)
def test_cjk_round_trips_and_unseen_chars_fall_back_to_bytes(roundtrip_tokenizers, text):
    char = roundtrip_tokenizers["char"]
    ids = char.encode(text)
    assert char.decode(ids) == text
    assert len(ids) <= 3 * len(text)  # at most 3 UTF-8 byte tokens per unseen character


def test_zerolm_han_pretokenizer_splits_han_and_digits():
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(ZEROLM_HAN), "isolated")
    pieces = [p for p, _ in split.pre_tokenize_str("床前明月光，疑是地上霜 in 1623")]
    assert pieces == [
        "床",
        "前",
        "明",
        "月",
        "光",
        "，",
        "疑",
        "是",
        "地",
        "上",
        "霜",
        " in",
        " ",
        "1",
        "6",
        "2",
        "3",
    ]


def test_bpe_learns_whole_characters_and_words(tiny_tokenizer):
    tok = tiny_tokenizer("bpe", TRAIN, vocab_size=600)
    assert len(tok.encode("明月")) <= 2  # whole (frequent) Han characters or the word, not 6 bytes
    assert len(tok.encode(" question")) == 1


def test_transformers_loads_and_encodes_identically(trained):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    kind, tok, path = trained
    texts = [
        *TRAIN[:4],
        "unseen 字符 🎉 and ﬁ ligature\t tabs  double  spaces\n\n",
        "<|user|>hi<|end|><|eos|>",
        "",
    ]
    for hf in (
        PreTrainedTokenizerFast.from_pretrained(str(path)),
        AutoTokenizer.from_pretrained(str(path)),
    ):
        for text in texts:
            assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), (kind, text)
        assert hf.eos_token_id == 2 and hf.pad_token_id == 0 and hf.bos_token_id == 1
        if kind != "wordpiece":
            assert hf.decode(tok.encode(texts[4])) == texts[4]
        else:
            assert hf.mask_token_id == SPECIAL_TOKENS.index("[MASK]")
            assert hf("hi")["input_ids"][0] == hf.cls_token_id


def test_vocab_too_small_is_a_clear_error():
    for kind in ("bpe", "char"):
        with pytest.raises(ValueError, match="too small.*at least 272"):
            train_tokenizer(TokenizerConfig(kind=kind, vocab_size=271), TRAIN, progress=False)


def test_char_vocab_is_most_frequent_first():
    tok = train_tokenizer(
        TokenizerConfig(kind="char", vocab_size=len(SPECIAL_TOKENS) + 256 + 3),
        ["aaab b"],
        progress=False,
    )
    # 'a' (3) > 'b' (2) > ' ' (1); min_frequency=2 keeps only a and b
    assert tok.hf.id_to_token(272) == "a" and tok.hf.id_to_token(273) == "b"
    assert tok.vocab_size == 274
    assert tok.decode(tok.encode("a c")) == "a c"


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_compression_report_by_language(tiny_tokenizer):
    from zerolm.tokenizer.report import compression_report

    tok = tiny_tokenizer("bpe", TRAIN, vocab_size=600)
    rep = compression_report(tok, TRAIN[:4])
    assert set(rep) == {"zh", "en"}
    zh = rep["zh"]
    assert zh["documents"] == 2 and zh["chars"] == len(TRAIN[0]) + len(TRAIN[1])
    assert zh["tokens"] == len(tok.encode(TRAIN[0])) + len(tok.encode(TRAIN[1]))
    assert zh["bytes_per_token"] == round(zh["bytes"] / zh["tokens"], 3)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab 床前明月光😀é\n，。"), max_size=60))
def test_stream_decoder_emits_whole_characters_that_add_up_to_the_text(
    roundtrip_tokenizers, trained_wordpiece, text
):
    from zerolm.tokenizer.stream import StreamDecoder

    for kind, tok in [*roundtrip_tokenizers.items(), ("wordpiece", trained_wordpiece)]:
        ids = tok.encode(text)
        dec = StreamDecoder(tok)
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == tok.decode(ids), kind  # the same text as one decode of all ids
        assert not any("\ufffd" in p for p in pieces), kind  # never half a character


@pytest.fixture(scope="module")
def trained_wordpiece(tiny_tokenizer):
    return tiny_tokenizer("wordpiece", TRAIN, vocab_size=600)


def test_completion_ids_start_a_new_document(roundtrip_tokenizers):
    tok = roundtrip_tokenizers["bpe"]
    texts = ["床前明月光", "To be, or not"]
    eos = tok.token_id("<|eos|>")
    assert tok.completion_ids(texts) == [[eos, *tok.encode(t)] for t in texts]


def test_check_tokenizers_refuses_another_vocabulary(roundtrip_tokenizers, tmp_path):
    from zerolm.tokenizer import check_tokenizers

    for kind, tok in roundtrip_tokenizers.items():
        tok.save(tmp_path / kind)
    tok = roundtrip_tokenizers["bpe"]
    tok.save(tmp_path / "same")
    check_tokenizers(tmp_path / "bpe", tmp_path / "same", "reference model")
    with pytest.raises(ValueError, match="reference model .* has a different tokenizer"):
        check_tokenizers(tmp_path / "bpe", tmp_path / "char", "reference model")
