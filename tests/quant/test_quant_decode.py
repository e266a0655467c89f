"""Quantized models in the fast decode path: decode_layout fuses quantized q/k/v and gate/up by
row concatenation (same state_dict), and Engine(compile=True) runs them (AOTInductor)."""

from __future__ import annotations

import copy

import pytest
import torch

from zerolm.config import ModelConfig, QuantConfig
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.kv_cache import KVCache
from zerolm.infer.sampling import SamplingParams
from zerolm.model import build_model, load_model, save_model
from zerolm.model.attention import FusedQKVAttention
from zerolm.model.layers import FusedGateUpFFN
from zerolm.quant.linear import QuantLinear
from zerolm.transforms.layout import decode_layout
from zerolm.transforms.quantize import quantize_model

IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
GREEDY = SamplingParams(temperature=0.0)


def _quantized(method="int8", scheme="sym", **kw):
    cfg = ModelConfig(
        preset="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **kw
    )
    m = build_model(cfg)
    m.init_weights(torch.Generator().manual_seed(0))
    return quantize_model(m.eval(), QuantConfig(method=method, scheme=scheme, head="int4"))


CASES = [("int8", "sym", False), ("int4", "sym", False), ("int4", "asym", True)]


@pytest.mark.parametrize("method,scheme,qkv_bias", CASES)
def test_fused_quantized_layout_keeps_values_and_state_dict(tmp_path, method, scheme, qkv_bias):
    split = _quantized(method, scheme, n_kv_heads=2, qkv_bias=qkv_bias)  # qkv_bias: Qwen2's
    fused = decode_layout(copy.deepcopy(split))
    attn, ffn = fused.blocks[0].attn, fused.blocks[0].ffn
    assert isinstance(attn, FusedQKVAttention) and isinstance(attn.wqkv, QuantLinear)
    assert isinstance(ffn, FusedGateUpFFN) and isinstance(ffn.gate_up, QuantLinear)
    assert (attn.wqkv.bias is not None) == qkv_bias
    want, got = split.state_dict(), fused.state_dict()
    assert list(got) == list(want)  # keys, in order
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    with torch.no_grad():
        torch.testing.assert_close(fused(IDS), split(IDS), atol=1e-5, rtol=0)
        save_model(fused, tmp_path)  # saved after decode_layout: the split layout on disk
        back = load_model(tmp_path, dtype=torch.float32)
        assert torch.equal(back(IDS), split(IDS))
        assert torch.equal(decode_layout(back)(IDS), fused(IDS))


def test_mixed_specs_are_not_fused():
    m = _quantized("int8")
    attn = m.blocks[0].attn
    k = attn.k
    q4 = _quantized("int4").blocks[0].attn.k
    attn.k = q4  # k at int4, q and v at int8: no common codes to concatenate
    decode_layout(m)
    assert type(m.blocks[0].attn).__name__ == "Attention" and m.blocks[0].attn.k is q4
    assert isinstance(m.blocks[1].attn, FusedQKVAttention), k


def _greedy(engine: Engine, prompts, new=12):
    req = GenerateRequest(max_new_tokens=new, sampling=GREEDY)
    return engine.generate(prompts, req)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_kv_cache_decode_equals_full_recomputation(method):
    m = decode_layout(_quantized(method))
    prompt = IDS[0, :5].tolist()
    got = _greedy(Engine(m), [prompt])[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got == ids[0, 5:].tolist()
    cache = KVCache.for_model(m, 1, 16)  # and the logits of each cached step, not only argmax
    eng = Engine(m)
    with torch.no_grad():
        eng.prefill([ids[0, :8].tolist()], cache)
        step = eng.decode(ids[:, 8:9], cache)
        torch.testing.assert_close(step, m(ids[:, :9])[:, -1], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method,scheme", [("int8", "sym"), ("int4", "asym")])
def test_compiled_quantized_decode_gives_eager_tokens(tmp_path, method, scheme):
    """AOTInductor with the quantized kernel inside (the C++ op where built, else the fused
    dequantize): batch 1 and batch 8 give the eager greedy tokens, and the saved program loads."""
    m = decode_layout(_quantized(method, scheme))
    prompts = [IDS[i % 2, : 3 + i].tolist() for i in range(8)]
    eager = _greedy(Engine(m), prompts)
    folder = str(tmp_path / "programs")
    compiled = Engine(m, compile=True, program_dir=folder)
    assert _greedy(compiled, prompts) == eager
    assert _greedy(compiled, prompts[:1]) == eager[:1]
    assert compiled.compiled  # no fall-back to eager
    again = Engine(m, compile=True, program_dir=folder)  # loads the saved programs
    assert _greedy(again, prompts) == eager
