"""Quantization codes: byte-exact with the gguf package's Q8_0 / Q4_0 / Q4_1, hand-built codes
round-trip exactly, dequantization error within each format's bound, and a quantized model saves
and loads as itself."""

import copy

import gguf.quants as gq
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from zerolm.config import ModelConfig, QuantConfig
from zerolm.model import build_model, load_model
from zerolm.model.io import save_model
from zerolm.quant.formats import Quantized, dequantize, pack_int4, quantize, unpack_int4
from zerolm.quant.linear import QuantLinear, quant_layers
from zerolm.transforms.quantize import quantize_model

FORMATS = [(8, "sym", T.Q8_0), (4, "sym", T.Q4_0), (4, "asym", T.Q4_1)]


def _as_gguf(qw: Quantized) -> np.ndarray:
    """Our codes laid out as GGUF blocks: d (f16) [m (f16)] then the 32 codes' bytes."""
    n, groups = qw.scales.shape
    parts = [qw.scales.view(torch.uint8).reshape(n, groups, 2)]
    if qw.mins is not None:
        parts.append(qw.mins.view(torch.uint8).reshape(n, groups, 2))
    parts.append(qw.qweight.view(torch.uint8).reshape(n, groups, -1))
    return torch.cat(parts, -1).reshape(n, -1).numpy()


@pytest.mark.parametrize("bits,scheme,ggml", FORMATS)
def test_codes_equal_the_gguf_packages_quantisation_byte_for_byte(bits, scheme, ggml):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 160, generator=g) * torch.rand(37, 1, generator=g)
    w[3, :32] = 0  # an all-zero block: scale 0, codes as ggml writes them
    w[5, 40] = 25.0  # an outlier
    qw = quantize(w, bits, 32, scheme)
    ref = gq.quantize(w.numpy(), ggml)
    assert np.array_equal(_as_gguf(qw), ref)
    assert np.array_equal(dequantize(qw, bits).numpy(), gq.dequantize(ref, ggml))


@pytest.mark.parametrize("bits,scheme,_", FORMATS)
@pytest.mark.parametrize("group", [32, 64, 128, 0])
def test_dequantisation_error_is_within_half_a_step(bits, scheme, _, group):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    qw = quantize(w, bits, group, scheme)
    g = group or 256
    step = qw.scales.float().abs().repeat_interleave(g, dim=1)  # (N, K): each weight's step
    err = (dequantize(qw, bits) - w).abs()
    # half a step, plus the float16 rounding (2^-11 relative) of the scale times the largest code
    # and of the min; int4 sym has codes -8..7 for a block whose largest weight sets -8, so a weight
    # near the opposite extreme clamps to 7 and may be a whole step off
    half = {8: 0.5 + 127 * 2**-11, 4: (1.0 if scheme == "sym" else 0.5) + 15 * 2**-11}[bits]
    lo = 0 if qw.mins is None else qw.mins.float().abs().repeat_interleave(g, dim=1) * 2**-11
    assert (err <= step * half + lo + 1e-6).all()
    assert err.max() > 0.1 * step.max()


def test_hand_built_codes_with_known_scales_round_trip_exactly():
    d = torch.tensor([[0.5, 0.25]], dtype=torch.float16)
    q8 = torch.arange(-127, 128, 4, dtype=torch.int8)[None]  # (1, 64)
    q8[0, 32] = -127  # a code of size 127 in each block sets its d
    w = q8.float() * d.float().repeat_interleave(32, 1)
    again = quantize(w, 8, 32)
    assert torch.equal(again.qweight, q8) and torch.equal(again.scales, d)
    # int4 sym: codes 0..15 with the extreme code 0 present (it sets d = value / -8)
    q4 = torch.arange(64, dtype=torch.uint8)[None] % 16
    w4 = (q4.float() - 8) * d.float().repeat_interleave(32, 1)
    again = quantize(w4, 4, 32)
    assert torch.equal(unpack_int4(again.qweight), q4) and torch.equal(again.scales, d)
    assert torch.equal(pack_int4(q4)[0, 0], torch.tensor(0 | (0 << 4), dtype=torch.uint8))
    assert torch.equal(unpack_int4(pack_int4(q4)), q4)


def test_a_group_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match="groups of 64 do not divide"):
        quantize(torch.randn(4, 96), 4, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(4, 96), 8, 48)


def _tiny(preset="llama", tie=True):
    cfg = ModelConfig(
        preset=preset, vocab_size=256, d_model=64, n_layers=2, n_heads=4, tie_embeddings=tie
    )
    m = build_model(cfg)
    m.init_weights(torch.Generator().manual_seed(0))
    return m.eval()


@pytest.mark.parametrize("method,scheme", [("int8", "sym"), ("int4", "sym"), ("int4", "asym")])
@pytest.mark.parametrize("preset,tie", [("llama", True), ("llama", False), ("gpt2", True)])
def test_a_quantized_model_saves_and_loads_as_itself(tmp_path, method, scheme, preset, tie):
    m = _tiny(preset, tie)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    q = quantize_model(copy.deepcopy(m), QuantConfig(method=method, scheme=scheme))
    layers = quant_layers(q)
    assert "tok_emb" in layers and all(isinstance(v, QuantLinear) for v in layers.values())
    per_block = 4 + (3 if preset == "llama" else 2)  # q k v o + the FFN's linears
    assert len([n for n in layers if n.startswith("blocks.")]) == 2 * per_block
    with torch.no_grad():
        out = q(ids)
        assert (out - m(ids)).abs().max() < (0.15 if method == "int4" else 0.02)
        save_model(q, tmp_path)
        back = load_model(tmp_path, dtype=torch.float32)
        assert torch.equal(back(ids), out)
    assert back.zerolm_quant["method"] == method


def test_quantizing_a_quantized_model_is_refused():
    q = quantize_model(_tiny(), QuantConfig(method="int8"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, QuantConfig(method="int4"))
