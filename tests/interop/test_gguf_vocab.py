"""GGUF tokenizers in and out: llama.cpp's own test vectors (the sdist's models/ggml-vocab-*.gguf
with .inp/.out, tokenized as tests/test-tokenizer-0.cpp does: add_special=false,
parse_special=false), a write -> read round trip, and refusals with their reasons."""

from __future__ import annotations

import random

import pytest

from zerolm.interop.gguf_file import fields, open_gguf
from zerolm.interop.gguf_tokenizer import tokenizer_files_from_gguf, write_tokenizer
from zerolm.tokenizer import Tokenizer

SEP = "\n__ggml_vocab_test__\n"
# every vocab GGUF with test vectors: what the import reads exactly, and what it refuses
SUPPORTED = [
    "command-r",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
    "gpt-2",
    "llama-bpe",
    "llama-spm",
    "mpt",
    "phi-3",
    "qwen2",
    "qwen35",
    "refact",
    "starcoder",
]
REFUSED = {
    "bert-bge": "tokenizer.ggml.model='bert'",
    "gemma-4": "tokenizer.ggml.model='gemma4'",
}


def cases(models, name: str) -> list[tuple[str, list[int]]]:
    path = models / f"ggml-vocab-{name}.gguf"
    inputs = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split(SEP)
    outputs = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    return [(s, [int(i) for i in o.split()]) for s, o in zip(inputs, outputs, strict=False)]


def test_every_vocab_file_with_vectors_is_listed(llama_cpp_models):
    have = {p.name[len("ggml-vocab-") : -len(".gguf.inp")] for p in llama_cpp_models.glob("*.inp")}
    assert have == set(SUPPORTED) | set(REFUSED)


@pytest.mark.slow
@pytest.mark.parametrize("name", SUPPORTED)
def test_vocab_gguf_gives_the_llama_cpp_ids(llama_cpp_models, tmp_path, name):
    tokenizer_files_from_gguf(
        fields(open_gguf(llama_cpp_models / f"ggml-vocab-{name}.gguf")), tmp_path
    )
    tok = Tokenizer.load(tmp_path)
    want = cases(llama_cpp_models, name)
    assert len(want) > 30
    got = tok.encode_batch([s for s, _ in want], split_special=False)  # parse_special=false
    assert [(s, g) for (s, _), g in zip(want, got)] == want


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_vocab_gguf_is_refused_by_name(llama_cpp_models, tmp_path, name):
    meta = fields(open_gguf(llama_cpp_models / f"ggml-vocab-{name}.gguf"))
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer") as e:
        tokenizer_files_from_gguf(meta, tmp_path)
    assert REFUSED[name] in str(e.value) and "gpt2 or llama" in str(e.value)
    assert not (tmp_path / "tokenizer.json").exists()


def test_unknown_pre_tokenizer_is_refused():
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "nonesuch",
        "tokenizer.ggml.tokens": ["a"],
    }
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='nonesuch'.*qwen2"):
        tokenizer_files_from_gguf(meta, None)  # type: ignore[arg-type]


def write_vocab_gguf(path, tok: Tokenizer) -> None:
    """A vocab-only GGUF (llama.cpp's vocab_only loading reads it, as the sdist's files)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    write_tokenizer(w, tok)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def mixed_strings(n: int, seed: int = 0) -> list[str]:
    """Seeded random strings of Han, CJK punctuation, Latin words, digits, whitespace runs,
    newlines, apostrophes and emoji."""
    rng = random.Random(seed)
    pieces = [
        *"床前明月光疑是地上霜举头望低思故乡春眠不觉晓处闻啼鸟",
        *"，。！？、；：「」《》（）　",
        *["the", "king's", "love", "thou", "art", "hath", "I'll", "we've", "THE", "Hello"],
        *"0123456789",
        " ",
        "  ",
        "   ",
        "\t",
        "\n",
        "\n\n",
        " \n",
        "'",
        "'s",
        "'LL",
        "😀",
        "🎉",
        "é",
        "ñ",
        "-",
        "...",
    ]
    return ["".join(rng.choices(pieces, k=rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def poems_tokenizer():
    """A zerolm BPE tokenizer (the default pre-tokenizer) on Tang poems and Shakespeare."""
    from itertools import islice

    from zerolm.config import TokenizerConfig
    from zerolm.data.sources import read_corpus
    from zerolm.tokenizer.train import train_tokenizer

    docs = [d.text for name in ("tang", "shakespeare") for d in islice(read_corpus(name), 300)]
    return train_tokenizer(TokenizerConfig(vocab_size=3000), docs, progress=False)


def test_write_then_read_gives_the_same_ids(poems_tokenizer, tmp_path):
    write_vocab_gguf(tmp_path / "v.gguf", poems_tokenizer)
    meta = fields(open_gguf(tmp_path / "v.gguf"))
    assert meta["tokenizer.ggml.pre"] == "qwen2"
    assert (
        meta["tokenizer.ggml.bos_token_id"] == poems_tokenizer.eos_id
    )  # what a document starts with
    tokenizer_files_from_gguf(meta, tmp_path / "tok")
    back = Tokenizer.load(tmp_path / "tok")
    texts = mixed_strings(300)
    assert back.encode_batch(texts) == poems_tokenizer.encode_batch(texts)
    assert back.completion_ids(texts[:5]) == poems_tokenizer.completion_ids(texts[:5])
    assert back.vocab_size == poems_tokenizer.vocab_size


def test_han_isolating_tokenizer_is_refused(tmp_path):
    import gguf

    from zerolm.config import TokenizerConfig
    from zerolm.tokenizer.train import train_tokenizer

    cfg = TokenizerConfig(vocab_size=300, min_frequency=1, pre="zerolm-han")
    tok = train_tokenizer(cfg, ["床前明月光，疑是地上霜。 the king's men 123"] * 3, progress=False)
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ValueError, match=r"Han-isolating.*--tokenizer.pre=qwen2"):
        write_tokenizer(w, tok)
