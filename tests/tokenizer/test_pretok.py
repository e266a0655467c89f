"""The llama.cpp pre-tokenizer table: names round-trip through a tokenizer's JSON, the patterns a
new tokenizer trains with keep `chunks` exact, and the default is exportable."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as _HFTokenizer

from zerolm.config import TokenizerConfig
from zerolm.tokenizer import SPECIAL_TOKENS, Tokenizer
from zerolm.tokenizer.pretok import PRE, TRAIN_PRE, normalise, pre_name, pre_name_of, pre_tokenizer
from zerolm.tokenizer.tokenizer import chunks


def _tokenizer_with(spec: dict) -> Tokenizer:
    """A zerolm-layout tokenizer (just the reserved specials) with the pre-tokenizer `spec`."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    model = {"type": "BPE", "vocab": vocab, "merges": []}
    hf = _HFTokenizer.from_str(json.dumps({"version": "1.0", "model": model}))
    hf.pre_tokenizer = pre_tokenizer(spec)
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(hf)


@pytest.mark.parametrize("name", list(PRE))
def test_pre_name_round_trips_for_every_table_entry(name):
    got = pre_name(_tokenizer_with(PRE[name].pre_tokenizer))
    assert got is not None
    assert normalise(PRE[got].pre_tokenizer) == normalise(PRE[name].pre_tokenizer)
    assert list(PRE).index(got) <= list(PRE).index(name)  # the first of identical entries


def test_pre_name_ignores_what_does_not_change_the_split():
    spec = json.loads(json.dumps(PRE["qwen2"].pre_tokenizer))
    spec["pretokenizers"][1]["trim_offsets"] = False
    assert pre_name_of(spec) == "qwen2"
    assert pre_name_of({"type": "Sequence", "pretokenizers": [PRE["gpt-2"].pre_tokenizer]}) == (
        "gpt-2"
    )
    assert pre_name_of(TRAIN_PRE["zerolm-han"]) is None
    assert pre_name_of(None) is None


def test_default_pre_is_a_llama_cpp_one():
    assert TokenizerConfig().pre in PRE
    assert set(TRAIN_PRE) - set(PRE) == {"zerolm-han"}


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab  \n\n\t明月，。12 x'sé😀\r\u3000\u9fff!", max_size=300),
    size=st.integers(1, 40),
    name=st.sampled_from(sorted(TRAIN_PRE)),
)
def test_chunks_never_cut_a_pretoken(text, size, name):
    split = pre_tokenizer(TRAIN_PRE[name])
    pieces = list(chunks(text, size))
    assert "".join(pieces) == text
    assert [p for c in pieces for p, _ in split.pre_tokenize_str(c)] == [
        p for p, _ in split.pre_tokenize_str(text)
    ]
