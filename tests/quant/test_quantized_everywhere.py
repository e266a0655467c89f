"""A directory written by `zerolm quantize` works in every command without a flag: generate and
chat give the quantized model's greedy tokens (recomputed here without a KV cache), serve answers
over real HTTP on 127.0.0.1 with the same text, eval-poems scores it (with its KL to the float
model), inspect shows its stored bytes per component, export writes GGUF as stored and HF as the
dequantized weights (which transformers reads back as the quantized model's logits)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from zerolm.cli import main
from zerolm.model import load_model, save_model
from zerolm.quant import kernels
from zerolm.quant.linear import quant_layers
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import prompt_ids

ROOT = Path(__file__).resolve().parents[2]
POEMS = [  # held-out requests for eval-poems: regular 五言绝句 with title and author
    {
        "title": "静夜思",
        "author": "李白",
        "text": "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    },
    {
        "title": "登鹳雀楼",
        "author": "王之涣",
        "text": "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
    },
]


@pytest.fixture(scope="module")
def dirs(tiny_model, tiny_tokenizer, tmp_path_factory):
    """(float dir, its int4 quantization by the CLI) of a tiny llama with a real BPE tokenizer."""
    root, tok = tmp_path_factory.mktemp("everywhere"), tiny_tokenizer()
    model = tiny_model(
        "llama", d_model=64, n_kv_heads=2, vocab_size=tok.vocab_size, max_seq_len=256
    )
    save_model(model.eval(), root / "float", tok)
    assert (
        main(["quantize", str(root / "float"), "--method", "int4", "--out", str(root / "q4")]) == 0
    )
    return root / "float", root / "q4"


@torch.no_grad()
def _greedy(model, ids: list[int], n: int, stops=()) -> list[int]:
    """Greedy continuation by full recomputation (no KV cache): the reference for every engine."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
    return out


def test_generate_and_chat_give_the_quantized_models_greedy_tokens(dirs, capsys):
    q = dirs[1]
    model, tok = load_model(q), Tokenizer.load(q)
    assert quant_layers(model)
    prompt = "床前明月光，"
    argv = ["generate", "--model", str(q), "--temperature", "0", "--max-new-tokens", "12", prompt]
    assert main(argv) == 0
    want = tok.decode(_greedy(model, tok.completion_ids([prompt])[0], 12, tok.stop_ids), True)
    assert capsys.readouterr().out == prompt + want + "\n"
    assert main([*argv[:-1], "--stream", prompt]) == 0
    assert capsys.readouterr().out == prompt + want + "\n"
    messages = [{"role": "user", "content": "Hello there!"}]
    argv = ["chat", str(q), "--prompt", messages[0]["content"], "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", "10"]) == 0
    reply = _greedy(model, prompt_ids(tok, messages), 10, tok.stop_ids)
    assert capsys.readouterr().out.strip() == tok.decode(reply).strip()  # chat shows specials


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


@pytest.mark.slow
def test_serve_answers_over_http_with_the_quantized_model(dirs):
    q = dirs[1]
    model, tok = load_model(q), Tokenizer.load(q)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "zerolm", "serve", str(q), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.2)
        prompt = "Hello there! How"
        got = _post(url + "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
        want = _greedy(model, tok.completion_ids([prompt])[0], 8, tok.stop_ids)
        assert got["choices"][0]["text"] == tok.decode(want, True)
        messages = [{"role": "user", "content": "Hello there!"}]
        body = {"messages": messages, "max_tokens": 8, "temperature": 0}
        chat = _post(url + "/v1/chat/completions", body)
        reply = _greedy(model, prompt_ids(tok, messages), 8, tok.stop_ids)
        assert chat["choices"][0]["message"]["content"] == tok.decode(reply, True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_eval_poems_scores_the_quantized_model_against_the_float_one(dirs, tmp_path, capsys):
    fdir, q = dirs
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "val.jsonl").write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in POEMS)
    )
    argv = ["eval-poems", str(q), "--docs", str(docs), "--reference", str(fdir)]
    assert main([*argv, "--max-new-tokens", "8", "--limit", "2"]) == 0
    got = json.loads(capsys.readouterr().out)[str(q)]
    # the KL is estimated from sampled replies (it can come out just below 0); int4 moved it
    assert got["n"] == 2 and 0 <= got["form_ok"] <= 1 and got["kl"] != 0


def test_inspect_shows_stored_bytes_per_component(dirs, capsys):
    fdir, q = dirs
    model = load_model(q)
    assert main(["inspect", str(q), "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    ffn = sum(m.nbytes() for n, m in quant_layers(model).items() if ".ffn." in n)
    assert a["bytes"]["ffn"] == ffn and a["float_bytes"]["ffn"] == 4 * a["parameters"]["ffn"]
    assert a["weights_bytes"] == sum(t.nbytes for t in model.state_dict().values())
    assert a["quantization"] == {
        "method": "int4",
        "layers": {
            "embedding": "int4 g32 sym",
            "attention": "int4 g32 sym",
            "ffn": "int4 g32 sym",
            "head": "int8 g32 sym",
        },
    }
    assert main(["inspect", str(fdir), "--json"]) == 0
    f = json.loads(capsys.readouterr().out)
    assert f["parameters"] == a["parameters"] and f["quantization"] is None
    assert f["forward_flops_per_token"] == a["forward_flops_per_token"]
    assert main(["inspect", str(q)]) == 0
    text = capsys.readouterr().out
    assert "bytes by component (as stored vs float, quantized with int4):" in text
    assert f"  ffn        {ffn:>12,} vs" in text


@pytest.mark.slow
def test_export_writes_gguf_as_stored_and_hf_dequantized(dirs, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    q = dirs[1]
    argv = ["export", str(q), "--format", "gguf", "--out", str(tmp_path / "q.gguf")]
    assert main(argv) == 0
    assert "(q4_0 + q8_0 blocks copied as stored)" in capsys.readouterr().out
    assert main(["export", str(q), "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr()
    assert "LlamaForCausalLM" in out.out and out.err.count("\n") == 1
    assert "written dequantized, as float32" in out.err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kernels.path("float"):  # dequantized weights on float x, as HF runs
        assert (hf(ids).logits - load_model(q)(ids)).abs().max() < 1e-4


@pytest.mark.slow
def test_compiled_decode_gives_the_pure_paths_tokens(dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZEROLM_CACHE", str(tmp_path / "cache"))  # a fresh compile, kept private
    argv = ["generate", "--model", str(dirs[1]), "--temperature", "0", "--max-new-tokens", "12"]
    assert main([*argv, "白日依山尽，"]) == 0
    pure = capsys.readouterr().out
    assert main([*argv, "--compile", "白日依山尽，"]) == 0
    assert capsys.readouterr().out == pure
