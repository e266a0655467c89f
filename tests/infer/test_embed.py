"""`zerolm embed` on a tiny random bert with a BERT-layout tokenizer: order, batching, truncation,
errors."""

import json
import logging

import numpy as np
import pytest
import torch

from zerolm.cli import main
from zerolm.config import ModelConfig
from zerolm.infer.embed import embed_texts
from zerolm.model import build_model, load_model, save_model
from zerolm.tokenizer import Tokenizer

WORDS = [
    "the",
    "a",
    "man",
    "dog",
    "cat",
    "is",
    "playing",
    "plays",
    "guitar",
    "instrument",
    "market",
    "stock",
    "fell",
    "today",
    "some",
    "##one",
    ".",
]
TEXTS = [
    "The man is playing the guitar.",
    "A dog.",
    "Some cat plays the guitar today.",
    "The stock market fell.",
    "a man",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    root = tmp_path_factory.mktemp("embed") / "model"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    hf = HFTokenizer(
        models.WordPiece({t: i for i, t in enumerate(specials + WORDS)}, unk_token="[UNK]")
    )
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.add_special_tokens(specials)
    model = build_model(
        ModelConfig(preset="bert", d_model=32, n_layers=2, n_heads=4, max_seq_len=10),
        vocab_size=hf.get_vocab_size(),
        seed=0,
    )
    save_model(model, root)
    hf.save(str(root / "tokenizer.json"))
    return root


def test_embed_order_batching_and_formats(model_dir, tmp_path, capsys):
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    ref = np.stack(
        [embed_texts(model, tok, [t])[0] for t in TEXTS]
    )  # each alone: no padding at all
    np.testing.assert_allclose(embed_texts(model, tok, TEXTS, batch_size=2), ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    (tmp_path / "in.txt").write_text(
        "\n".join(TEXTS[:2]) + "\n\n" + "\n".join(TEXTS[2:]) + "\n"
    )  # a blank line
    assert (
        main(
            [
                "embed",
                str(model_dir),
                "--input",
                str(tmp_path / "in.txt"),
                "--output",
                str(tmp_path / "e.npy"),
                "--batch-size",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    got = np.load(tmp_path / "e.npy")
    assert got.dtype == np.float32 and got.shape == (5, 32)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    capsys.readouterr()
    assert (
        main(["embed", str(model_dir), "--input", str(tmp_path / "in.jsonl"), "--quiet"]) == 0
    )  # JSONL to stdout
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), ref, atol=1e-6)


def test_long_texts_are_truncated_with_a_warning(model_dir, caplog):
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    long = (
        "the man is playing the guitar today some dog fell"  # 10 tokens + [CLS] [SEP] > window 10
    )
    with caplog.at_level(logging.WARNING, logger="zerolm"):
        got = embed_texts(model, tok, [long, "a dog"])
    assert "1 of 2 texts are longer than 10 tokens: truncated" in caplog.text
    ids = [tok.token_id("[CLS]"), *tok.encode(long)[:8], tok.token_id("[SEP]")]
    with torch.no_grad():
        ref = model.embed(model.hidden(torch.tensor([ids])))[0].numpy()
    np.testing.assert_allclose(got[0], ref, atol=1e-5)
    short = embed_texts(model, tok, [long], max_tokens=5)  # [CLS] + 3 tokens + [SEP]
    assert not np.allclose(short[0], got[0])


def test_errors_are_clear(model_dir, tmp_path, capsys):
    def error(*args):
        assert main(["embed", *map(str, args)]) == 2
        return capsys.readouterr().err

    assert "does not exist" in error(model_dir, "--input", tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "holds no texts" in error(model_dir, "--input", tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    assert "bad.jsonl:2: no string field 'text'" in error(
        model_dir, "--input", tmp_path / "bad.jsonl"
    )
    (tmp_path / "ok.txt").write_text("a dog\n")
    assert "name a .jsonl or a .npy" in error(
        model_dir, "--input", tmp_path / "ok.txt", "--output", tmp_path / "x.csv"
    )
    assert "--max-tokens must be in 3..10" in error(
        model_dir, "--input", tmp_path / "ok.txt", "--max-tokens", "11"
    )
    decoder = tmp_path / "decoder"
    save_model(
        build_model(
            ModelConfig(preset="gpt2", d_model=16, n_layers=1, n_heads=2, max_seq_len=8),
            vocab_size=30,
        ),
        decoder,
    )
    assert "is a decoder model; `zerolm embed` needs a bert model" in error(
        decoder, "--input", tmp_path / "ok.txt"
    )


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_in_the_input_names_the_file_and_line(tmp_path, suffix):
    from zerolm.infer.embed import read_texts

    path = tmp_path / f"in{suffix}"
    good = b'{"text": "a man"}\n' if suffix == ".jsonl" else b"a man\n"
    path.write_bytes(good + good.replace(b"man", b"m\xffn"))
    with pytest.raises(
        ValueError, match=rf"in\{suffix}: invalid UTF-8 at byte offset \d+ \(line 2\); convert"
    ):
        read_texts(path)
