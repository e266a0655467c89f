"""The Python API (zerolm.load / zerolm.fit) gives what the CLI and the engine give."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import zerolm
from zerolm.config import load_config
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.model import load_model
from zerolm.tokenizer import EOS, Tokenizer

POEMS = [
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
]
TINY = {
    "tokenizer": {"kind": "char", "vocab_size": 400, "min_frequency": 1},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32},
    "train": {"steps": 8, "batch_size": 8, "eval_every": 0, "lr": 1e-2, "precision": "fp32"},
}


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    (root / "p.jsonl").write_text(
        "".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in POEMS * 30)
    )
    zerolm.fit(
        stage="pretrain",
        progress=False,
        out_dir=str(root / "run"),
        data={"inputs": [str(root / "p.jsonl")], "dedup": "none"},
        **TINY,
    )
    return root / "run" / "model"


def _engine_text(model_dir, ids, stop_ids, **sampling):
    """What the engine itself generates for prompt ids, decoded without the stop tokens."""
    tok, model = Tokenizer.load(model_dir), load_model(model_dir)
    seed = sampling.pop("seed")
    req = GenerateRequest(
        max_new_tokens=10,
        sampling=SamplingParams(**sampling),
        stop_token_ids=stop_ids,
        seed=seed,
    )
    return [
        tok.decode([t for t in out if t not in stop_ids])
        for out in Engine(model).generate(ids, req)
    ]


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "top_k": 20}])
def test_generate_equals_the_engine(decoder_dir, sampling):
    m = zerolm.load(decoder_dir)
    tok = m.tokenizer
    eos = tok.token_id(EOS)
    prompts = ["明月", "春眠不觉"]
    ids = [[eos, *tok.encode(p)] for p in prompts]
    got = m.generate(prompts, max_new_tokens=10, seed=3, **sampling)
    assert got == _engine_text(decoder_dir, ids, (eos,), seed=3, **sampling)
    one = m.generate("明月", max_new_tokens=10, seed=3, **sampling)
    assert [one] == _engine_text(decoder_dir, ids[:1], (eos,), seed=3, **sampling)


def test_generate_stop_string_and_errors(decoder_dir):
    m = zerolm.load(decoder_dir)
    full = m.generate("明月", max_new_tokens=10, temperature=0)
    cut = m.generate("明月", max_new_tokens=10, temperature=0, stop=[full[2]])
    assert full.startswith(cut) and full[2] not in cut
    with pytest.raises(ValueError, match="unknown sampling option 'temprature'"):
        m.generate("明月", temprature=0)
    with pytest.raises(ValueError, match="never saw in training"):
        m.generate("xyz")
    with pytest.raises(ValueError, match="embeddings need a bert model"):
        m.embed(["明月"])


def test_chat_equals_the_cli(decoder_dir):
    """The reply `zerolm chat --prompt` prints (a seeded sample, system message included)."""
    m = zerolm.load(decoder_dir)
    got = m.chat("明月", system="诗", max_new_tokens=10, seed=5, temperature=0.8)
    r = subprocess.run(
        [sys.executable, "-m", "zerolm", "chat", decoder_dir, "--prompt", "明月", "--system", "诗"]
        + ["--max-new-tokens", "10", "--seed", "5", "--temperature", "0.8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == got + "\n"
    messages = [{"role": "system", "content": "诗"}, {"role": "user", "content": "明月"}]
    assert m.chat(messages, max_new_tokens=10, seed=5, temperature=0.8) == got


def test_embed_equals_the_cli(tmp_path):
    docs = ["春风照江南。\n明月入故乡。", "白云随高楼。\n流水送远山。", "孤舟望江南。"] * 40
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    )
    cfg = load_config(
        None,
        {
            "out_dir": str(tmp_path / "bert"),
            "data": {"inputs": [str(tmp_path / "d.jsonl")], "dedup": "none"},
            "tokenizer": {"kind": "wordpiece", "vocab_size": 100, "min_frequency": 1},
            "model": {
                "arch": "bert",
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 2,
                "max_seq_len": 32,
            },
            "train": {"steps": 4, "batch_size": 8, "eval_every": 0, "precision": "fp32"},
        },
    )
    zerolm.fit(cfg, progress=False, **{"train.lr": 3e-3})  # a Config plus a dotted override
    assert "lr = 0.003" in (tmp_path / "bert" / "config.toml").read_text()
    texts = ["春风照江南。", "孤舟望远山。", "明月"]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "zerolm", "embed", tmp_path / "bert" / "model", "--quiet"]
        + ["--input", tmp_path / "t.txt", "--output", tmp_path / "e.npy"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    m = zerolm.load(tmp_path / "bert" / "model")
    got = m.embed(texts)
    assert got.shape == (3, 32) and np.array_equal(got, np.load(tmp_path / "e.npy"))
    assert np.array_equal(m.embed("明月"), got[2])
    with pytest.raises(ValueError, match="generate needs a decoder model"):
        m.generate("明月")


def test_train_from_a_recipe_and_its_errors(tmp_path):
    (tmp_path / "d.txt").write_text("明月光。\n\n白日尽。\n\n春眠晓。\n", encoding="utf-8")
    (tmp_path / "r.toml").write_text(
        '[data]\ntxt_unit = "paragraph"\nval_fraction = 0.3\n'
        '[tokenizer]\nkind = "char"\nmin_frequency = 1\n'
    )
    zerolm.fit(
        tmp_path / "r.toml",
        stage="prepare",
        progress=False,
        out_dir=str(tmp_path / "run"),
        data={"inputs": [str(tmp_path / "d.txt")]},
    )
    assert Tokenizer.load(tmp_path / "run" / "tokenizer").encode("明月") != []
    with pytest.raises(ValueError, match="unknown stage 'pretrian'"):
        zerolm.fit(stage="pretrian")
    with pytest.raises(ValueError, match="Did you mean 'steps'"):
        zerolm.fit(tmp_path / "r.toml", **{"train.stepz": 1})
    with pytest.raises(ValueError, match="prepare starts from no model"):
        zerolm.fit(stage="prepare", base_model="runs/x")


def test_import_is_cheap_and_versioned():
    script = "import sys, zerolm; print('torch' in sys.modules, zerolm.__version__)"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert r.stdout.split() == ["False", pyproject["project"]["version"]], r.stderr
    assert {"load", "fit", "Model", "__version__"} <= set(zerolm.__all__)
