import pytest
import torch
import torch.nn.functional as F

from zerolm.config import ModelConfig
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.interop.hf import export_hf
from zerolm.model import build_model, load_model, save_model
from zerolm.transforms.layout import decode_layout
from zerolm.transforms.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_adapters,
    lora_config_of,
    lora_state_dict,
    merge_lora,
    save_adapters,
    set_adapters_enabled,
    trainable_report,
)

V = 50
IDS = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def make(tiny_model):
    """make(preset="llama", seed=0, **over): a fresh tiny model per call (vocab V, window 16)."""

    def build(preset="llama", seed=0, **over):
        return tiny_model(preset, V, seed=seed, **({"max_seq_len": 16} | over)).eval()

    return build


def randomize_b(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


ALL = ("q", "k", "v", "o", "up", "gate", "down", "lm_head")


def test_zero_b_leaves_logits_unchanged_and_only_adapters_train(make):
    model = make()
    ref = logits(model)
    apply_lora(model, LoRAConfig(rank=8, targets=ALL))
    assert torch.equal(logits(model), ref)
    assert isinstance(model.blocks[0].attn.q, LoRALinear) and model.blocks[
        1
    ].ffn.gate.weight.shape == (96, 32)
    model(IDS).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
        assert (p.grad is not None) == ("lora_" in name), name


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_merge_equals_unmerged_and_saves_like_any_model(preset, tmp_path, make):
    model = make(preset)
    targets = ("q", "k", "v", "o", "up", "down") + (
        ("gate", "lm_head") if preset == "llama" else ()
    )
    randomize_b(apply_lora(model, LoRAConfig(rank=4, targets=targets)))
    adapted = logits(model)
    with adapters_disabled(model):
        assert not torch.allclose(logits(model), adapted, atol=1e-3)  # the adapters do something
    merge_lora(model)
    assert lora_config_of(model) is None
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # as before apply_lora
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    assert set(model.state_dict()) == set(make(preset).state_dict())
    save_model(model, tmp_path / "m")
    torch.testing.assert_close(logits(load_model(tmp_path / "m")), adapted, atol=1e-5, rtol=0)
    export_hf(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_adamw_on_adapters_reduces_loss_and_leaves_base_untouched(make):
    model = make().train()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, targets=("q", "v", "up")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_save_load_reproduces_logits_and_refuses_other_bases(tmp_path, make):
    model = randomize_b(apply_lora(make(), LoRAConfig(rank=4, alpha=8, targets=("q", "o", "down"))))
    path = save_adapters(model, tmp_path / "a.safetensors")
    assert not list(tmp_path.glob(".*tmp"))
    fresh = load_adapters(make(), path)
    assert lora_config_of(fresh) == lora_config_of(model)
    assert torch.equal(logits(fresh), logits(model))
    assert set(lora_state_dict(fresh)) == {
        f"blocks.{i}.{m}.lora_{x}"
        for i in range(2)
        for m in ("attn.q", "attn.o", "ffn.down")
        for x in "AB"
    }
    with pytest.raises(ValueError, match="different weights"):
        load_adapters(make(seed=1), path)
    with pytest.raises(ValueError, match="d_model=32 vs 64"):
        load_adapters(make(d_model=64), path)
    with pytest.raises(ValueError, match="already has"):
        load_adapters(apply_lora(make(), LoRAConfig(rank=2)), path)


def test_bad_targets_and_configs(make):
    msg = (
        r"LoRA target 'qkv' matches no module; linear modules here: "
        r"q, k, v, o, up, gate, down, lm_head$"
    )
    with pytest.raises(ValueError, match=msg):
        apply_lora(make(), LoRAConfig(rank=8, targets=("q", "qkv")))
    msg = (
        r"targets 'gate', 'lm_head' match no module; .*: q, k, v, o, up, down "
        r"\(lm_head is tied to tok_emb"
    )
    with pytest.raises(ValueError, match=msg):
        apply_lora(make("gpt2"), LoRAConfig(rank=8, targets=("gate", "lm_head")))
    for bad in [dict(rank=0), dict(alpha=0.0), dict(dropout=1.0), dict(targets=())]:
        with pytest.raises(ValueError, match="invalid LoRA config"):
            apply_lora(make(), LoRAConfig(**{"rank": 8, **bad}))
    model = apply_lora(make(), LoRAConfig(rank=8))
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, LoRAConfig(rank=8))


def test_adapters_disabled_gives_exactly_the_base(make):
    model = make()
    ref = logits(model)
    randomize_b(apply_lora(model, LoRAConfig(rank=8, targets=ALL)))
    adapted = logits(model)
    with adapters_disabled(model):
        assert torch.equal(logits(model), ref)
    assert torch.equal(logits(model), adapted)
    set_adapters_enabled(model, False)
    assert torch.equal(logits(model), ref)


def test_kv_cache_greedy_generation_equals_full_recomputation(make):
    model = randomize_b(
        apply_lora(make(n_kv_heads=2), LoRAConfig(rank=8, targets=ALL, dropout=0.1))
    )
    before = logits(model)
    decode_layout(model)  # transposes the wrapped base weights' storage, leaves the adapters alone
    assert not model.blocks[0].attn.q.base.weight.is_contiguous()
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    prompts = [[5, 6, 7, 8], [3]]
    req = GenerateRequest(max_new_tokens=5, sampling=SamplingParams(temperature=0))
    out = Engine(model).generate(prompts, req)
    for prompt, got in zip(prompts, out):
        seq = list(prompt)
        for _ in range(5):
            seq.append(int(logits(model, torch.tensor([seq]))[0, -1].argmax()))
        assert got == seq[len(prompt) :]


def test_bf16_autocast_forward_and_backward(make):
    model = randomize_b(apply_lora(make(), LoRAConfig(rank=8, targets=ALL)))
    with torch.autocast("cpu", torch.bfloat16):
        out = model(IDS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), logits(model), atol=0.1, rtol=0.05)
    out.float().logsumexp(-1).mean().backward()
    assert model.blocks[0].attn.q.lora_A.grad.dtype == torch.float32


def test_adapter_file_size_and_report(tmp_path):
    model = build_model(
        ModelConfig(preset="llama", d_model=256, n_layers=4), vocab_size=8192, seed=0
    )
    full = trainable_report(model)
    assert full["trainable"] == full["total"] and full["adapter_file_bytes"] == 0
    report = trainable_report(apply_lora(model, LoRAConfig(rank=8)))
    assert report["adapter"] == report["trainable"] == 4 * 4 * 8 * (256 + 256)
    assert report["base"] == full["total"] and report["optimizer_bytes_full"] == 8 * full["total"]
    assert report["optimizer_bytes_lora"] == 8 * report["trainable"]
    size = save_adapters(model, tmp_path / "a.safetensors").stat().st_size
    assert size == report["adapter_file_bytes"] and 200_000 < size < 400_000


def test_adapter_gradients_are_the_chain_rule_of_the_merged_weight_gradient(make):
    model = randomize_b(apply_lora(make(), LoRAConfig(rank=4, alpha=4.0, targets=("q", "down"))))
    dense = merge_lora(
        randomize_b(apply_lora(make(), LoRAConfig(rank=4, alpha=4.0, targets=("q", "down"))))
    )
    model(IDS).logsumexp(-1).mean().backward()
    dense(IDS).logsumexp(-1).mean().backward()
    pairs = [
        (model.blocks[0].attn.q, dense.blocks[0].attn.q),
        (model.blocks[1].ffn.down, dense.blocks[1].ffn.down),
    ]
    for lora, lin in pairs:
        g = lin.weight.grad  # dL/dW of W = base + scale·B·A
        torch.testing.assert_close(
            lora.lora_B.grad, lora.scale * g @ lora.lora_A.T.detach(), atol=1e-6, rtol=1e-4
        )
        torch.testing.assert_close(
            lora.lora_A.grad, lora.scale * lora.lora_B.T.detach() @ g, atol=1e-6, rtol=1e-4
        )
