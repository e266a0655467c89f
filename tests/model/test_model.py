import json
import math

import pytest
import torch
import torch.nn.functional as F

from zerolm.config import ModelConfig
from zerolm.infer.kv_cache import KVCache
from zerolm.model import build_model, load_model, resolve, save_model
from zerolm.model.attention import attend
from zerolm.model.layers import RMSNorm, sinusoidal_table

V = 97
VARIANTS = {
    "simple": dict(preset="simple"),
    "gpt2": dict(preset="gpt2"),
    "llama": dict(preset="llama"),
    "llama-gqa": dict(preset="llama", n_kv_heads=2),
    "llama-mqa-tied": dict(preset="llama", n_kv_heads=1, tie_embeddings=True),
    "gpt2-sinusoidal-rmsnorm": dict(preset="gpt2", position="sinusoidal", norm="rmsnorm"),
    "simple-rope-swiglu": dict(preset="simple", position="rope", ffn="swiglu"),
    "llama-window": dict(preset="llama", sliding_window=4),
}


def make(name, **over):
    kw = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=24) | VARIANTS[name] | over
    return build_model(ModelConfig(**kw), vocab_size=V, seed=0).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_causality(name):
    model = make(name)
    ids = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    assert logits.shape == (3, 16, V)
    for j in (5, 11):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 1) % V
        after = model(changed)
        assert torch.equal(after[:, :j], logits[:, :j])  # the past never sees the future
        assert not torch.allclose(after[:, j:], logits[:, j:])


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_equals_full_recomputation(name):
    model = make(name)
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = KVCache.for_model(model, 2)
    parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_attention_matches_naive_recomputation():
    """One llama layer against attention written out by hand: softmax(QK^T/sqrt(d) + causal) V."""
    model = make("llama", n_layers=1, n_kv_heads=2)
    blk = model.blocks[0]
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))
    h = blk.norm1(x)
    q = blk.attn.q(h).view(2, 10, 4, 8).transpose(1, 2)
    k = blk.attn.k(h).view(2, 10, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = blk.attn.v(h).view(2, 10, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    pos = torch.arange(10).float()
    inv = 1 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)

    def rope(t):
        rot = torch.cat([-t[..., 4:], t[..., :4]], -1)
        return t * ang.cos() + rot * ang.sin()

    q, k = rope(q), rope(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.triu(torch.ones(10, 10, dtype=torch.bool), 1), -math.inf)
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32)
    expected = x + blk.attn.o(y)
    expected = expected + blk.ffn(blk.norm2(expected))
    rope_cs = (model.rope_cos[:10][None, None], model.rope_sin[:10][None, None])
    assert torch.allclose(blk(x, rope=rope_cs), expected, atol=1e-5)


@pytest.mark.parametrize("T,S,masked", [(9, 9, False), (1, 9, False), (4, 9, True), (9, 9, True)])
def test_explicit_bf16_attention_matches_fused_kernel(T, S, masked):
    """The bf16 explicit path (matmuls + float32 softmax) against SDPA on the same bf16 inputs, for
    plain causal, a single decode query, cached queries and a padding + window mask."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g).bfloat16() for n in (T, S, S))
    mask = None
    if masked:
        q_slots, k_slots = torch.arange(S - T, S)[:, None], torch.arange(S)[None, :]
        window = (k_slots <= q_slots) & (q_slots - k_slots < 5)  # (T, S)
        key_valid = torch.tensor(
            [[True] * S, [False] * 3 + [True] * (S - 3)]
        )  # row 1: 3 padding slots
        mask = (window[None, None] & key_valid[:, None, None, :]) | (
            q_slots == k_slots
        )  # a query sees itself
    got = attend(q, k, v, mask)
    ref = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None and T > 1
    )
    assert got.dtype == torch.bfloat16 and got.shape == (2, 4, T, 8)
    assert (got.float() - ref).abs().max() < 2e-2  # bf16 rounding of p and of the output


def test_sliding_window_receptive_field():
    model = make("llama-window", n_layers=1)  # one layer: token t sees positions t-3..t
    ids = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(4))
    base = model(ids)[0, 12]
    for j, affects in ((8, False), (9, True), (12, True)):
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1) % V
        assert torch.allclose(model(changed)[0, 12], base) != affects


def test_norms_and_positions_by_hand():
    x = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(RMSNorm(2, 0.0)(x), x / math.sqrt(12.5))
    table = sinusoidal_table(4, 4)
    assert torch.allclose(
        table[1], torch.tensor([math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2)])
    )
    assert torch.allclose(F.layer_norm(x, (2,)), torch.tensor([[-1.0, 1.0]]), atol=1e-4)


def test_presets_resolve():
    simple = resolve(ModelConfig(preset="simple", d_model=64), V)
    assert (simple.norm, simple.norm_placement, simple.position, simple.ffn, simple.dropout) == (
        "layernorm",
        "post",
        "learned",
        "relu",
        0.1,
    )
    llama = resolve(ModelConfig(preset="llama", d_model=96, n_heads=4), V)
    assert (llama.norm, llama.position, llama.ffn, llama.bias, llama.d_ff, llama.n_kv_heads) == (
        "rmsnorm",
        "rope",
        "swiglu",
        False,
        256,
        4,
    )
    assert resolve(ModelConfig(preset="gpt2", bias=False), V).bias is False  # overrides win


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(n_heads=5), "n_heads=5 does not divide model.d_model=32"),
        (dict(n_kv_heads=3), "n_kv_heads=3 must divide model.n_heads=4"),
        (dict(vocab_size=0), "vocab_size is unset"),
    ],
)
def test_bad_shapes_are_clear_errors(over, message):
    with pytest.raises(ValueError, match=message):
        kw = dict(preset="llama", d_model=32, n_heads=4) | over
        resolve(ModelConfig(**kw), None if "vocab_size" in over else V)


def test_unknown_preset_is_a_config_error():
    from zerolm.config import load_config

    with pytest.raises(
        ValueError,
        match="'mistral' is not one of '', 'simple', 'gpt2', 'llama', 'bert', 'transformer'",
    ):
        load_config(None, {"model": {"preset": "mistral"}})


def test_save_load_round_trip_and_mismatched_checkpoint(tmp_path):
    model = make("gpt2")
    save_model(model, tmp_path / "m")
    ids = torch.randint(0, V, (1, 9))
    assert torch.equal(load_model(tmp_path / "m")(ids), model(ids))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["zerolm_model"]["d_model"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit this model config.*shape mismatch"):
        load_model(tmp_path / "m")
    with pytest.raises(ValueError, match="no model at"):
        load_model(tmp_path / "nothing")


def test_sequence_longer_than_window_is_an_error():
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=24"):
        make("gpt2")(torch.zeros(1, 25, dtype=torch.long))


def test_dropout_only_in_training():
    model = make("simple")
    ids = torch.randint(0, V, (2, 12))
    assert torch.equal(model(ids), model(ids))
    model.train()
    assert not torch.equal(model(ids), model(ids))
