"""GGUF tokenizers in and out: llama.cpp's own test vectors (the sdist's models/ggml-vocab-*.gguf
with .inp/.out, tokenized as tests/test-tokenizer-0.cpp does: add_special=false,
parse_special=false), a write -> read round trip, and refusals with their reasons."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from zerolm.interop.gguf_file import fields, open_gguf
from zerolm.interop.gguf_tokenizer import (
    llama_cpp_adds,
    tokenizer_files_from_gguf,
    write_tokenizer,
)
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import CHAT_TEMPLATE
from zerolm.tokenizer.pretok import NOT_EXACT, PRE, TRAIN_PRE, pre_name

SEP = "\n__ggml_vocab_test__\n"
# every vocab GGUF with test vectors: what the import reads exactly, and what it refuses
SUPPORTED = [
    "bert-bge",
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
    assert REFUSED[name] in str(e.value) and "gpt2, llama, bert" in str(e.value)
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


# TokenizerConfig.pre choices llama.cpp tokenizes exactly
EXPORTABLE = [p for p in TRAIN_PRE if p in PRE and p not in NOT_EXACT]


@pytest.fixture(scope="module", params=EXPORTABLE)
def poems_tokenizer(request):
    """A zerolm BPE tokenizer (each exportable pre-tokenizer) on Tang poems and Shakespeare."""
    from itertools import islice

    from zerolm.config import TokenizerConfig
    from zerolm.data.sources import read_corpus
    from zerolm.tokenizer.train import train_tokenizer

    docs = [d.text for name in ("tang", "shakespeare") for d in islice(read_corpus(name), 300)]
    cfg = TokenizerConfig(vocab_size=3000, pre=request.param)
    return train_tokenizer(cfg, docs, progress=False)


def test_write_then_read_gives_the_same_ids(poems_tokenizer, tmp_path):
    write_vocab_gguf(tmp_path / "v.gguf", poems_tokenizer)
    meta = fields(open_gguf(tmp_path / "v.gguf"))
    assert meta["tokenizer.ggml.pre"] == pre_name(poems_tokenizer) in EXPORTABLE
    # llama.cpp adds nothing; its bos_token is <|bos|>, which zerolm's chat template starts with
    assert meta["tokenizer.ggml.bos_token_id"] == poems_tokenizer.bos_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.eot_token_id"] == poems_tokenizer.turn_end
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    tokenizer_files_from_gguf(meta, tmp_path / "tok")
    back = Tokenizer.load(tmp_path / "tok")
    texts = mixed_strings(300)
    assert back.encode_batch(texts) == poems_tokenizer.encode_batch(texts)
    assert back.completion_ids(texts[:5]) == poems_tokenizer.completion_ids(texts[:5])
    assert back.vocab_size == poems_tokenizer.vocab_size


def test_han_isolating_tokenizer_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ValueError, match=r"Han-isolating.*--tokenizer.pre=qwen2"):
        write_tokenizer(w, _train("zerolm-han"))


def llama_cpp_ids(bin_dir, gguf_path, texts: list[str], sep: int, tok, tmp_path) -> list[list[int]]:
    """llama-tokenize's ids of each text (parse_special on, bos as the file says). One process
    for all: the texts joined by the control token `sep`, which llama.cpp (as HF) cuts the text
    at before any splitting, so each part tokenizes as if alone; the first keeps the bos."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(tok.hf.id_to_token(sep).join(texts), encoding="utf-8")
    cmd = [bin_dir / "llama-tokenize", "-m", gguf_path, "-f", prompt, "--ids", "--log-disable"]
    run = subprocess.run([*cmd, "--no-escape"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ids = json.loads(run.stdout.strip().splitlines()[-1])
    out: list[list[int]] = [[]]
    for i in ids:
        if i == sep:
            out.append([])
        else:
            out[-1].append(i)
    return out


def check_llama_cpp_agrees(llama_cpp, gguf_path, tok, sep: int, tmp_path) -> None:
    texts = mixed_strings(1000, seed=1)
    assert all(tok.hf.id_to_token(sep) not in t for t in texts)
    got = llama_cpp_ids(llama_cpp, gguf_path, texts, sep, tok, tmp_path)
    bos, add_bos, _ = llama_cpp_adds(tok)  # what the GGUF has llama.cpp put before a text
    want = [[bos] * add_bos + tok.encode(texts[0]), *tok.encode_batch(texts[1:])]
    assert len(got) == len(want)
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[0]}"


@pytest.mark.slow
def test_llama_cpp_tokenizes_a_zerolm_tokenizer_as_zerolm(llama_cpp, poems_tokenizer, tmp_path):
    write_vocab_gguf(tmp_path / "zerolm.gguf", poems_tokenizer)
    sep = poems_tokenizer.token_id("<|reserved_0|>")
    check_llama_cpp_agrees(llama_cpp, tmp_path / "zerolm.gguf", poems_tokenizer, sep, tmp_path)


@pytest.mark.slow
def test_llama_cpp_tokenizes_an_extended_tokenizer_as_zerolm(llama_cpp, poems_tokenizer, tmp_path):
    """`zerolm tokenizer extend` appends merges: the pre name still comes from the JSON."""
    from zerolm.tokenizer.extend import extend_tokenizer

    words = [
        w for w in ("明月光", "思故乡", "地上霜", "举头望") if len(poems_tokenizer.encode(w)) > 1
    ]
    tok = extend_tokenizer(poems_tokenizer, words, tmp_path).tokenizer
    assert tok.vocab_size > poems_tokenizer.vocab_size
    write_vocab_gguf(tmp_path / "ext.gguf", tok)
    assert fields(open_gguf(tmp_path / "ext.gguf"))["tokenizer.ggml.pre"] == pre_name(tok)
    check_llama_cpp_agrees(
        llama_cpp, tmp_path / "ext.gguf", tok, tok.token_id("<|reserved_0|>"), tmp_path
    )


@pytest.mark.slow
def test_llama_cpp_tokenizes_smollm2_as_zerolm(llama_cpp, smollm2_gguf, tmp_path):
    """The real SmolLM2 file, its import, and the import exported again: the same ids."""
    meta = fields(open_gguf(smollm2_gguf))
    assert meta["tokenizer.ggml.pre"] == "smollm"
    tokenizer_files_from_gguf(meta, tmp_path / "tok")
    tok = Tokenizer.load(tmp_path / "tok")
    sep = tok.token_id("<|endoftext|>")
    check_llama_cpp_agrees(llama_cpp, smollm2_gguf, tok, sep, tmp_path)
    write_vocab_gguf(tmp_path / "smol.gguf", tok)
    again = fields(open_gguf(tmp_path / "smol.gguf"))
    assert again["tokenizer.ggml.pre"] == "smollm"
    check_llama_cpp_agrees(llama_cpp, tmp_path / "smol.gguf", tok, sep, tmp_path)


def _train(pre: str):
    from zerolm.config import TokenizerConfig
    from zerolm.tokenizer.train import train_tokenizer

    cfg = TokenizerConfig(vocab_size=400, min_frequency=1, pre=pre)
    return train_tokenizer(
        cfg, ["床前明月光，疑是地上霜。  \u3000 the king's men 123"] * 3, progress=False
    )


def test_a_pre_tokenizer_llama_cpp_gets_wrong_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ValueError, match=r"deepseek-llm pre-tokenizer is not exact.*U\+3000"):
        write_tokenizer(w, _train("deepseek-llm"))


def test_llama_cpp_splits_deepseek_llm_otherwise(llama_cpp, tmp_path, monkeypatch):
    """Why deepseek-llm is refused: llama.cpp's ids for spaces before U+3000 are not HF's."""
    from itertools import islice

    from zerolm.config import TokenizerConfig
    from zerolm.data.sources import read_corpus
    from zerolm.interop import gguf_tokenizer
    from zerolm.tokenizer.train import train_tokenizer

    docs = [d.text for d in islice(read_corpus("shakespeare"), 3)]
    tok = train_tokenizer(
        TokenizerConfig(vocab_size=1000, pre="deepseek-llm"), docs, progress=False
    )
    assert tok.hf.token_to_id("\u0120\u0120") is not None  # "  " is one token
    monkeypatch.setattr(gguf_tokenizer, "NOT_EXACT", {})  # write it anyway, to show why not
    write_vocab_gguf(tmp_path / "ds.gguf", tok)
    texts = ["  \u3000", "x  \u3000y"]
    sep = tok.token_id("<|reserved_0|>")
    got = llama_cpp_ids(llama_cpp, tmp_path / "ds.gguf", texts, sep, tok, tmp_path)
    assert got[0][1:] != tok.encode(texts[0]) and got[1] == tok.encode(texts[1])
