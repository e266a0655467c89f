"""decode_layout: fused modules with the split model's values, logits, state_dict and
checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from zerolm.config import LoRAConfig, ModelConfig
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.interop.hf import export_hf
from zerolm.model import build_model, load_model, load_state, save_model
from zerolm.model.attention import Attention, FusedQKVAttention
from zerolm.model.layers import FFN, FusedGateUpFFN, FusedRMSNorm, RMSNorm, apply_rope
from zerolm.model.protocol import LanguageModel
from zerolm.transforms.layout import decode_layout
from zerolm.transforms.lora import LoRALinear, apply_lora, merge_lora

V = 89
GREEDY = SamplingParams(temperature=0)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3], [20, 21, 22, 23], [40, 41]]
IDS = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
LAYOUTS = [("llama", {"n_kv_heads": 2}), ("gpt2", {})]


def make(preset, **over):
    kw = dict(preset=preset, d_model=32, n_layers=2, n_heads=4, max_seq_len=40) | over
    return build_model(ModelConfig(**kw), vocab_size=V, seed=5).eval()


@pytest.mark.parametrize("preset, kw", LAYOUTS)
def test_decode_layout_keeps_values_and_outputs(tmp_path, preset, kw):
    model = make(preset, **kw)
    req = GenerateRequest(max_new_tokens=10, sampling=GREEDY)
    with torch.no_grad():
        before_logits, before = model(IDS), Engine(model).generate(PROMPTS, req)
    assert decode_layout(model) is model and isinstance(model, LanguageModel)
    attn = model.blocks[0].attn
    assert type(attn) is FusedQKVAttention and not attn.wqkv.weight.is_contiguous()
    assert not attn.o.weight.is_contiguous()  # every linear streams its (in, out) rows
    assert (type(model.blocks[0].ffn) is FusedGateUpFFN) == (preset == "llama")  # SwiGLU only
    assert (type(model.blocks[0].norm1) is FusedRMSNorm) == (preset == "llama")
    with torch.no_grad():  # the fused path
        assert torch.allclose(model(IDS), before_logits, atol=1e-5)
    assert Engine(model).generate(PROMPTS, req) == before
    model(IDS).sum().backward()  # the fused modules are exact under autograd: gradients reach q, v
    qd, kvd = attn.h * attn.dh, attn.kv * attn.dh
    assert attn.wqkv.weight.grad[:qd].abs().sum() > 0
    assert attn.wqkv.weight.grad[qd + kvd :].abs().sum() > 0
    save_model(model, tmp_path / "m")  # still saves (contiguous copies) and reloads the same values
    assert torch.allclose(load_model(tmp_path / "m")(IDS), before_logits, atol=1e-5)


@pytest.mark.parametrize("preset, kw", LAYOUTS)
def test_state_dict_keys_shapes_and_values_are_the_split_models(tmp_path, preset, kw):
    """Saved after decode_layout, a state_dict loads into a fresh model, and a fresh model's loads
    into a decode-laid-out one (copying or adopting tensors); save_model and export_hf write the
    same files either way."""
    split, fused = make(preset, **kw), decode_layout(make(preset, **kw))
    ref, got = split.state_dict(), fused.state_dict()
    assert list(got) == list(ref)  # same keys, same order
    for k in ref:
        assert got[k].shape == ref[k].shape and torch.equal(got[k], ref[k]), k
    fresh = build_model(split.cfg, seed=9).eval()  # other weights
    load_state(fresh, got, assign=False)
    with torch.no_grad():
        want = split(IDS)
        torch.testing.assert_close(fresh(IDS), want, atol=1e-5, rtol=0)
        for assign in (False, True):
            target = decode_layout(build_model(split.cfg, seed=9).eval())
            load_state(target, {k: v.clone() for k, v in ref.items()}, assign=assign)
            assert type(target.blocks[1].attn) is FusedQKVAttention
            torch.testing.assert_close(target(IDS), want, atol=1e-5, rtol=0)
    for name, m in (("split", split), ("fused", fused)):
        save_model(m, tmp_path / name)
        export_hf(m, tmp_path / f"hf-{name}")
    for f in ("model.safetensors", "config.json"):
        for d in ("", "hf-"):
            assert (tmp_path / f"{d}split" / f).read_bytes() == (
                tmp_path / f"{d}fused" / f
            ).read_bytes()


def test_fused_modules_equal_a_naive_recomputation_from_the_split_weights():
    """FusedQKVAttention's projections and FusedGateUpFFN equal matmuls with the split weights."""
    model = make("llama", n_kv_heads=2)
    w = {k: v.clone() for k, v in model.state_dict().items()}
    decode_layout(model)
    blk = model.blocks[0]
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))  # (B, T, D)
    cos, sin = (t[:7][None, None] for t in (model.rope_cos, model.rope_sin))

    def heads(name, n):  # (B, n, T, Dh)
        return (x @ w[f"blocks.0.attn.{name}.weight"].T).view(2, 7, n, 8).transpose(1, 2)

    q, k, v = blk.attn.project(x, (cos, sin))
    torch.testing.assert_close(q, apply_rope(heads("q", 4), cos, sin), atol=1e-6, rtol=0)
    torch.testing.assert_close(k, apply_rope(heads("k", 2), cos, sin), atol=1e-6, rtol=0)
    torch.testing.assert_close(v, heads("v", 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(blk.attn.project_q(x), heads("q", 4), atol=1e-6, rtol=0)
    kv = blk.attn.project_kv(x)  # cross-attention: repeated to H heads
    torch.testing.assert_close(kv[1], heads("v", 2).repeat_interleave(2, dim=1), atol=1e-6, rtol=0)
    g, u = (x @ w[f"blocks.0.ffn.{n}.weight"].T for n in ("gate", "up"))
    ffn = (F.silu(g) * u) @ w["blocks.0.ffn.down.weight"].T
    torch.testing.assert_close(blk.ffn(x), ffn, atol=1e-6, rtol=0)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps)
    assert torch.equal(blk.norm1(x), w["blocks.0.norm1.weight"] * rms)  # bit for bit


def test_encoder_decoder_attention_fuses_self_and_cross_attention():
    cfg = ModelConfig(arch="encdec", d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    model = build_model(cfg, vocab_size=V, seed=3).eval()
    src, tgt = IDS[:, :6], IDS[:, 3:]
    with torch.no_grad():
        want = model(src, tgt)
        decode_layout(model)
        assert type(model.decoder.blocks[0].cross_attn) is FusedQKVAttention
        torch.testing.assert_close(model(src, tgt), want, atol=1e-5, rtol=0)


def test_lora_before_decode_layout_keeps_its_wrapped_parts_and_merges():
    """A LoRA-wrapped q or gate keeps its module split; other parts fuse; o stays LoRA-wrapped."""
    model = apply_lora(make("llama"), LoRAConfig(rank=4, targets=("q", "o")))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
        want = model(IDS)
    decode_layout(model)
    attn, ffn = model.blocks[0].attn, model.blocks[0].ffn
    assert type(attn) is Attention and type(ffn) is FusedGateUpFFN
    assert not ffn.gate_up.weight.requires_grad and type(model.blocks[0].norm1) is FusedRMSNorm
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), want, atol=1e-5, rtol=0)
    model = apply_lora(make("llama"), LoRAConfig(rank=4, targets=("o", "down")))
    decode_layout(model)
    attn, ffn = model.blocks[0].attn, model.blocks[0].ffn
    assert type(attn) is FusedQKVAttention and isinstance(attn.o, LoRALinear)
    assert type(ffn) is FusedGateUpFFN and isinstance(ffn.down, LoRALinear)
    merged = merge_lora(model)
    assert list(merged.state_dict()) == list(make("llama").state_dict())
    assert type(merged.blocks[0].attn.o) is torch.nn.Linear


def test_decode_layout_is_idempotent_and_keeps_train_mode_and_frozen_weights():
    model = make("llama").train()
    model.blocks[0].requires_grad_(False)
    decode_layout(decode_layout(model))
    assert model.training and model.blocks[0].attn.training
    assert not model.blocks[0].attn.wqkv.weight.requires_grad
    assert (
        model.blocks[1].attn.wqkv.weight.requires_grad
        and model.blocks[1].norm1.weight.requires_grad
    )
    assert not any(type(m) in (Attention, FFN, RMSNorm) for m in model.modules())  # all fused
