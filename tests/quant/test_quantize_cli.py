"""`zerolm quantize`: flags and dotted [quant] keys give the same model, the directory is the
quantized model itself (codes equal quantize_model's, tokenizer copied), one summary line, and bad
input is one line with exit status 2 that leaves nothing behind."""

from __future__ import annotations

import pytest
import torch

from zerolm.cli import main
from zerolm.config import QuantConfig
from zerolm.model import load_model, save_model
from zerolm.model.io import read_quant_meta
from zerolm.quant.linear import quant_layers
from zerolm.tokenizer import Tokenizer
from zerolm.transforms.quantize import quantize_model


@pytest.fixture(scope="module")
def float_dir(tiny_model, tiny_tokenizer, tmp_path_factory):
    tok = tiny_tokenizer()
    out = tmp_path_factory.mktemp("float") / "m"
    save_model(tiny_model("llama", d_model=64, vocab_size=tok.vocab_size).eval(), out, tok)
    return out


def test_quantize_writes_the_quantized_model_and_one_line(float_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    argv = ["quantize", str(float_dir), "--method", "int4", "--scheme", "asym", "--out", str(out)]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and line.startswith("quantized 16 layers to int4 (group 32, asym")
    size = sum(t.numel() * t.element_size() for t in load_model(float_dir).state_dict().values())
    assert f"{size:,} -> " in line and "x smaller" in line
    want = quantize_model(load_model(float_dir), QuantConfig(method="int4", scheme="asym"))
    got = load_model(out)
    assert read_quant_meta(out) == want.zerolm_quant
    for name, layer in quant_layers(want).items():
        for a, b in zip(layer.quantized(), quant_layers(got)[name].quantized(), strict=True):
            assert (a is None and b is None) or torch.equal(a, b), name
    assert Tokenizer.load(out).vocab_size == Tokenizer.load(float_dir).vocab_size
    # the dotted keys are the same settings
    dotted = ["quantize", str(float_dir), "--quant.method=int4", "--quant.scheme", "asym"]
    assert main([*dotted, "--out", str(tmp_path / "dotted")]) == 0
    assert (tmp_path / "dotted" / "model.safetensors").read_bytes() == (
        out / "model.safetensors"
    ).read_bytes()


def test_head_and_group_flags(float_dir, tmp_path):
    out = tmp_path / "q"
    argv = ["quantize", str(float_dir), "--method", "int8", "--group", "0", "--head", "float"]
    assert main([*argv, "--out", str(out)]) == 0
    layers = read_quant_meta(out)["layers"]
    assert "lm_head" not in layers and layers["blocks.0.ffn.down"] == {
        "bits": 8,
        "group": 0,
        "scheme": "sym",
    }


def _refused(argv: list[str], match: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_bad_input_is_one_line(float_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    q = ["quantize", str(float_dir), "--out", str(out)]
    _refused([*q, "--method", "int8", "--scheme", "asym"], "int8 is symmetric only", capsys)
    _refused([*q, "--method", "int4", "--group", "48"], "groups of 48 do not divide", capsys)
    _refused([*q, "--quant.group=96"], "groups of 96 do not divide", capsys)
    assert not out.exists()
    bert = tmp_path / "bert"
    save_model(tiny_model("bert").eval(), bert)
    _refused(["quantize", str(bert), "--out", str(out)], "supports decoder models", capsys)
    encdec = tmp_path / "encdec"
    save_model(tiny_model("transformer").eval(), encdec)
    _refused(["quantize", str(encdec), "--out", str(out)], "supports decoder models", capsys)
    assert not out.exists()
    assert main(q) == 0
    capsys.readouterr()
    _refused(q, "exists: choose a new --out directory, or pass --force", capsys)
    again = ["quantize", str(out), "--out", str(tmp_path / "twice")]
    _refused(again, "already quantized (int8)", capsys)
    _refused(["quantize", str(float_dir), "--out", str(float_dir)], "is the input model", capsys)
    assert main([*q, "--method", "int4", "--force"]) == 0  # --force replaces it
    assert read_quant_meta(out)["method"] == "int4"


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_read_the_calibration_text(float_dir, tmp_path, capsys, method):
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"第{i}首：白日依山尽，黄河入海流。" * 3 for i in range(400)))
    argv = ["quantize", str(float_dir), "--method", method, "--calib-data", str(text)]
    argv += ["--calib-seqs", "8", "--calib-seq-len", "32", "--out", str(tmp_path / method)]
    assert main(argv) == 0
    assert f"to {method} (group 32, sym" in capsys.readouterr().out
    meta = read_quant_meta(tmp_path / method)
    assert meta["method"] == method and meta["layers"]["blocks.0.attn.q"]["bits"] == 4
    # the draw is the seed's: the same flags give the same file
    again = [*argv[:-1], str(tmp_path / "again")]
    assert main(again) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / method / "model.safetensors"
    ).read_bytes()
    short = ["quantize", str(float_dir), "--method", method, "--calib-data", str(text)]
    short += ["--calib-seqs", "100000", "--out", str(tmp_path / "short")]
    _refused(short, "calibration text too short", capsys)
    assert not (tmp_path / "short").exists()
