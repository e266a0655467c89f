"""`zerolm pretrain --init DIR`: continue an imported HF model on the user's own text, prepared
with the model's own tokenizer; bits per byte before and after; settings that contradict the
model are one-line errors that write nothing."""

import json
import random
import re
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.processors import TemplateProcessing

from zerolm.cli import main
from zerolm.config import load_config
from zerolm.data.prepare import document_start, prepare
from zerolm.interop.hf import import_hf
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer

ARCHS = ("llama",)  # qwen2 imports through the same path: test_sft_imported covers it
EN = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "we read books"]
ZH = ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡", "春眠不觉晓", "处处闻啼鸟"]


@pytest.fixture(scope="module", params=ARCHS)
def model_dir(request, hf_decoder, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"imported-{request.param}") / "model"
    import_hf(hf_decoder(request.param), out)
    return out


def text_file(path, lines: int = 120):
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            en = ", ".join(rng.choice(EN) for _ in range(3))
            f.write(f"{en}. {'，'.join(rng.sample(ZH, 3))}。\n")
    return path


def args(model_dir, text, out, *extra):
    return [
        "pretrain",
        "--init",
        str(model_dir),
        str(text),
        "--out",
        str(out),
        "--data.txt_unit=line",
        "--model.max_seq_len=64",
        *extra,
    ]


@pytest.mark.slow
def test_continued_pretraining_lowers_bits_per_byte_and_the_model_generates(
    model_dir, tmp_path, capsys
):
    text, out = text_file(tmp_path / "text.txt"), tmp_path / "run"
    train = ["--train.steps=24", "--train.batch_size=4", "--train.warmup_steps=0"]
    train += ["--train.lr=3e-3", "--train.eval_every=0", "--train.precision=fp32"]
    assert main(args(model_dir, text, out, *train, "--quiet")) == 0
    printed = capsys.readouterr().out
    got = re.search(
        r"bits per byte: ([\d.]+) before \(step 0, .*\) -> ([\d.]+) after 24 steps", printed
    )
    assert got, printed
    before, after = float(got[1]), float(got[2])
    assert after < before - 1.0
    # the shards hold the model's own ids: each document, then its eos
    tok = Tokenizer.load(model_dir)
    meta = json.loads((out / "shards" / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["eos_id"] == tok.eos_id
    first = json.loads((out / "docs" / "train.jsonl").read_text().splitlines()[0])["text"]
    stream = np.fromfile(out / "shards" / "train-00000.bin", dtype=meta["dtype"])
    want = tok.encode(first) + [tok.eos_id]
    assert stream[: len(want)].tolist() == want
    # the output keeps the model's architecture (its own window) and tokenizer, and generates
    model = load_model(out / "model")
    assert model.cfg == load_model(model_dir).cfg
    assert Tokenizer.load(out / "model").template is not None
    gen = ["generate", "--model", str(out / "model"), "the cat", "--temperature", "0"]
    assert main([*gen, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("the cat")


def _bigger_tokenizer(model_dir, tmp_path, n: int):
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    hf = HFTokenizer.from_file(str(other / "tokenizer.json"))
    hf.add_tokens([f"<|new{i}|>" for i in range(n)])
    hf.save(str(other / "tokenizer.json"))
    return other


@pytest.mark.parametrize("case", ["model-key", "other-tokenizer", "vocab", "not-a-decoder"])
def test_settings_that_contradict_the_model_are_one_line_errors(model_dir, tmp_path, capsys, case):
    text, out = text_file(tmp_path / "text.txt", 10), tmp_path / "run"
    init, extra = model_dir, []
    if case == "model-key":
        extra, error = ["--model.d_model=128"], r"gives the architecture: drop --model\.d_model"
    elif case == "other-tokenizer":
        extra = [f"--tokenizer.path={_bigger_tokenizer(model_dir, tmp_path, 1)}"]
        error = r"is not the tokenizer of --init .*; drop --tokenizer\.path"
    elif case == "vocab":
        init = _bigger_tokenizer(model_dir, tmp_path, 1)
        error = r"its tokenizer has 49153 tokens but the model embeds 49152: resize"
    else:
        init = tmp_path / "bert"
        init.mkdir()
        bert = {"zerolm_model": {"arch": "bert", "vocab_size": 99}}
        (init / "config.json").write_text(json.dumps(bert))
        error = r"is a bert model: pretrain --init continues decoders"
    assert main(args(init, text, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("zerolm: error: ") and re.search(error, err), err
    assert not out.exists()


def test_documents_start_as_the_tokenizer_starts_a_prompt(model_dir, tmp_path):
    tok = Tokenizer.load(model_dir)
    assert document_start(tok) == []  # SmolLM2 adds nothing: documents follow the eos
    with_bos = tmp_path / "bos"
    shutil.copytree(model_dir, with_bos)
    hf = HFTokenizer.from_file(str(with_bos / "tokenizer.json"))
    bos = tok.token_str(tok.bos_id)
    hf.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_id)]
    )
    hf.save(str(with_bos / "tokenizer.json"))
    assert document_start(Tokenizer.load(with_bos)) == [tok.bos_id]  # as Llama's adds <s>
    text = text_file(tmp_path / "text.txt", 20)
    overrides = {"out_dir": str(tmp_path / "run"), "tokenizer": {"path": str(with_bos)}}
    overrides["data"] = {"inputs": [str(text)], "txt_unit": "line"}
    prepare(load_config(None, overrides), progress=False)
    first = json.loads((tmp_path / "run/docs/train.jsonl").read_text().splitlines()[0])["text"]
    stream = np.fromfile(tmp_path / "run/shards/train-00000.bin", dtype=np.uint16)
    want = [tok.bos_id, *tok.encode(first), tok.eos_id]
    assert stream[: len(want)].tolist() == want
