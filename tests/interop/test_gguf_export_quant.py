"""GGUF export of quantized models (zerolm/interop/gguf_blocks.py): group-32 int8 / int4-sym /
int4-asym layers are written as Q8_0 / Q4_0 / Q4_1 by copying their codes and scales, so the file's
bytes equal both our stored codes and the gguf package's own quantisation of the float weights;
transformers' GGUF loader reads the file as the dequantized zerolm model (logits within 1e-4), and
llama.cpp continues prompts greedily as `zerolm generate` does on the quantized directory. Other
groups are re-encoded only on an explicit --dtype."""

from __future__ import annotations

import copy

import gguf
import gguf.quants as gq
import numpy as np
import pytest
import test_gguf_export as float_export
import torch
from test_gguf_export import MARGIN, PROMPTS, SHAPES, _same_greedy

from zerolm.cli import main
from zerolm.config import QuantConfig
from zerolm.interop.gguf_blocks import as_blocks
from zerolm.interop.gguf_export import _gguf_name, _state, export_gguf, gguf_arch, permute
from zerolm.model import load_model, save_model
from zerolm.quant import kernels
from zerolm.quant.linear import quant_layers
from zerolm.tokenizer import Tokenizer
from zerolm.transforms.quantize import quantize_model

transformers = pytest.importorskip("transformers")
trained = float_export.trained  # its fixture: tiny models trained to wide greedy margins
T = gguf.GGMLQuantizationType
KINDS = {  # QuantConfig (method, scheme) -> the GGUF type of the body's matrices
    ("int8", "sym"): T.Q8_0,
    ("int4", "sym"): T.Q4_0,
    ("int4", "asym"): T.Q4_1,
}


def _quantized(model, method: str, scheme: str, **kw):
    return quantize_model(
        copy.deepcopy(model).eval(), QuantConfig(method=method, scheme=scheme, **kw)
    )


def _read(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _our_blocks(model) -> dict[str, np.ndarray]:
    """Each quantized layer's stored codes + scales in GGUF's block layout, in llama.cpp's row
    order (llama's Q/K rows permuted for its RoPE), by GGUF tensor name."""
    cfg, out = model.cfg, {}
    for name, layer in quant_layers(model).items():
        blocks = as_blocks(layer.quantized())
        part = name.rsplit(".", 1)[-1]
        if name.startswith("blocks.") and part in ("q", "k"):
            blocks = permute(blocks, cfg.n_heads if part == "q" else cfg.n_kv_heads)
        out[str(_gguf_name(f"{name}.weight"))] = blocks.numpy()
    return out


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_blocks_equal_our_codes_and_the_gguf_packages_quantisation(
    tiny_model, preset, kind, tmp_path
):
    model = tiny_model(preset, d_model=64, vocab_size=96).eval()
    q = _quantized(model, *kind)
    path = export_gguf(q, tmp_path / "q.gguf")
    floats, _ = _state(model, gguf_arch(model.cfg), "f32")  # the float weights, llama.cpp's layout
    tensors, ours = _read(path), _our_blocks(q)
    head = "token_embd.weight" if model.cfg.tie_embeddings else "output.weight"  # int8 (auto)
    copied = 0
    for name, t in tensors.items():
        if t.tensor_type == T.F32:
            assert floats[name].dim() == 1 or "position" in name, name
            continue
        assert t.tensor_type == (T.Q8_0 if name == head else KINDS[kind]), name
        want = gq.quantize(floats[name].numpy(), t.tensor_type)
        got = np.asarray(t.data).reshape(want.shape)
        assert np.array_equal(got, want), name
        if preset == "llama":  # gpt2's fused attn_qkv: its parts are checked by the line above
            assert np.array_equal(got, ours[name]), name
        copied += 1
    assert copied == len(quant_layers(q)) - (2 * q.cfg.n_layers if preset == "gpt2" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_transformers_reads_the_dequantized_model(
    tiny_model, tiny_tokenizer, preset, kind, tmp_path
):
    tok = tiny_tokenizer()  # transformers reads gpt2's vocabulary size from it
    model = tiny_model(preset, vocab_size=tok.vocab_size, **SHAPES[preset]).eval()
    q = _quantized(model, *kind)
    path = export_gguf(q, tmp_path / "q.gguf", tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), kernels.path("float"):  # the dequantized weights on float x, as HF
        diff = (hf(ids).logits - q(ids)).abs().max().item()
        moved = (q(ids) - model(ids)).abs().max().item()
    print(f"{preset} {kind}: transformers vs zerolm {diff:.2e} (quantization moved {moved:.2e})")
    assert diff <= 1e-4 and moved > 1e-3  # the quantized model is compared, not the float one


def test_other_groups_need_an_explicit_dtype_and_are_re_encoded(tiny_model, tmp_path, capsys):
    model = tiny_model("llama", d_model=64, vocab_size=96).eval()
    q = _quantized(model, "int4", "sym", group=64)
    with pytest.raises(ValueError, match=r"groups of 64.*pass --dtype") as e:
        export_gguf(q, tmp_path / "refused.gguf")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())
    path = export_gguf(q, tmp_path / "q.gguf", dtype="q8_0")  # dequantized, then Q8_0
    dequantized, _ = _state(q, "llama", "f32")
    for name, t in _read(path).items():
        if t.tensor_type != T.F32:
            assert t.tensor_type == T.Q8_0
            want = gq.quantize(dequantized[name].numpy(), T.Q8_0)
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), name
    # the CLI: the same one-line refusal naming the fix, and no file
    save_model(q, tmp_path / "g64")
    argv = ["export", str(tmp_path / "g64"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--group 32" in err and not (tmp_path / "x.gguf").exists()


def test_an_explicit_dtype_of_the_stored_type_copies(tiny_model, tmp_path):
    """--dtype q4_0 on an int4-sym model copies its Q4_0 body (no second rounding) and re-encodes
    its int8 head as Q4_0 from the dequantized values; --dtype f16 writes every matrix as f16."""
    q = _quantized(tiny_model("llama", d_model=64, vocab_size=96).eval(), "int4", "sym")
    tensors, ours = _read(export_gguf(q, tmp_path / "q4.gguf", dtype="q4_0")), _our_blocks(q)
    assert np.array_equal(
        np.asarray(tensors["blk.0.ffn_down.weight"].data), ours["blk.0.ffn_down.weight"]
    )
    assert tensors["output.weight"].tensor_type == T.Q4_0
    f16 = _read(export_gguf(q, tmp_path / "f16.gguf", dtype="f16"))
    assert {t.tensor_type for t in f16.values()} == {T.F16, T.F32}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_llama_cpp_continues_the_quantized_model_as_zerolm_does(
    llama_cpp, trained, kind, tmp_path, capsys
):
    """The trained tiny llama, quantized; zerolm generates from the quantized directory, llama.cpp
    from its GGUF (llama.cpp also rounds the activations to 8 bits: only steps where zerolm's top
    logit leads by MARGIN are compared)."""
    path = trained("llama")
    tok = Tokenizer.load(path)
    q = _quantized(load_model(path), *kind)
    save_model(q, tmp_path / "q", tok)
    gguf_path = export_gguf(load_model(tmp_path / "q"), tmp_path / "q.gguf", tok)
    compared = _same_greedy(
        llama_cpp, tmp_path / "q", gguf_path, PROMPTS, 16, MARGIN["tiny"], capsys
    )
    assert compared >= 25
