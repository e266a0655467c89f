import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zerolm.config import LoRAConfig, QuantConfig, load_config
from zerolm.finetune.sft import sft
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.model import load_model, save_model
from zerolm.quant import frozen, kernels
from zerolm.quant.formats import dequantize, quantize
from zerolm.quant.linear import QuantLinear, quant_layers
from zerolm.transforms.lora import (
    LoRALinear,
    QuantLoRALinear,
    apply_lora,
    load_adapters,
    lora_config_of,
    merge_lora,
    save_adapters,
)
from zerolm.transforms.quantize import quantize_model

V = 64
IDS = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
ALL = ("q", "k", "v", "o", "up", "gate", "down", "lm_head")
FORMATS = [("int8", "sym"), ("int4", "sym"), ("int4", "asym")]


@pytest.fixture
def make(tiny_model):
    """make(method, scheme): a tiny untied llama quantized in that format (head int8)."""

    def build(method="int8", scheme="sym", seed=0):
        m = tiny_model("llama", V, seed=seed, max_seq_len=16, tie_embeddings=False).eval()
        return quantize_model(m, QuantConfig(method=method, scheme=scheme))

    return build


def randomize_b(model, seed=1, size=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * size)
    return model


def logits(model, ids=IDS):
    """On the float path: the dequantized base on float x (the op also rounds x to int8 blocks, a
    separate bounded error that tests/quant/test_kernels.py checks)."""
    with torch.no_grad(), kernels.path("float"):
        return model(ids)


def buffers(model):
    return {k: v.clone() for k, v in model.named_buffers() if not v.is_floating_point()}


@pytest.mark.parametrize("method,scheme", FORMATS)
def test_gradients_reach_the_adapters_only_and_the_codes_never_change(method, scheme, make):
    model = randomize_b(apply_lora(make(method, scheme), LoRAConfig(rank=4, targets=ALL)))
    assert isinstance(model.lm_head, QuantLoRALinear)
    assert isinstance(model.lm_head.base, QuantLinear)
    codes = buffers(model)
    assert len(codes) > 20  # qweight and scales of every quantized layer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = F.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        adapter = "lora_" in name
        assert p.requires_grad == adapter and (p.grad is not None) == adapter, name
        assert not adapter or p.grad.abs().sum() > 0, name
    after = buffers(model)
    assert after.keys() == codes.keys() and all(torch.equal(after[k], v) for k, v in codes.items())


def test_adapter_gradients_equal_lora_over_the_dequantized_float_base(make, monkeypatch):
    monkeypatch.setattr(frozen, "BLOCK_ELEMENTS", 1000)  # several uneven row blocks per layer
    cfg = LoRAConfig(rank=4, targets=("q", "v", "down", "lm_head"))
    q = make("int4", "asym")
    dense = copy.deepcopy(q)
    for name, layer in quant_layers(dense).items():  # the same weights, as float layers
        f = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        f.weight = nn.Parameter(layer.weight)
        parent, _, attr = name.rpartition(".")
        if name == "tok_emb":
            f = nn.Embedding(layer.out_features, layer.in_features, _weight=layer.weight)
        setattr(dense.get_submodule(parent) if parent else dense, attr, f)
    models = [randomize_b(apply_lora(m, cfg)) for m in (q, dense)]
    for m in models:
        m(IDS).logsumexp(-1).mean().backward()
    torch.testing.assert_close(logits(models[0]), logits(models[1]), atol=1e-5, rtol=0)
    grads = [{k: p.grad for k, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * (2 * 3 + 1)
    for k, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][k], atol=1e-6, rtol=1e-4)


def test_frozen_linear_matches_float_in_blocks_and_under_bf16(monkeypatch):
    monkeypatch.setattr(frozen, "BLOCK_ELEMENTS", 64 * 7)  # 7 rows a block: 50 = 7 * 7 + 1
    w, b = torch.randn(50, 64), torch.randn(50)
    q = quantize(w, 4, 32, "sym")
    wd = dequantize(q, 4)
    x = torch.randn(3, 5, 64, requires_grad=True)
    frozen.frozen_linear(x, q, 4, b).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, wd, b).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-5)
    with torch.autocast("cpu", torch.bfloat16):
        y = frozen.frozen_linear(x, q, 4, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("method,scheme", FORMATS)
def test_merging_into_the_dequantized_base_equals_the_unmerged_model(
    method, scheme, make, tmp_path
):
    model = randomize_b(apply_lora(make(method, scheme), LoRAConfig(rank=4, targets=ALL)))
    adapted = logits(model)
    merge_lora(model)
    assert lora_config_of(model) is None
    assert all(type(model.blocks[i].attn.q) is nn.Linear for i in range(2))
    assert set(quant_layers(model)) == set(model.zerolm_quant["layers"]) == {"tok_emb"}
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert set(quant_layers(back)) == {"tok_emb"}
    torch.testing.assert_close(logits(back), adapted, atol=1e-5, rtol=0)


def test_requantizing_a_merge_rounds_small_updates_away(make):
    """Why merge_lora keeps merged layers float: re-quantizing loses a good part of a small
    update (here a third), merging into float none of it."""
    base = make("int4")
    ref = logits(base)
    model = randomize_b(apply_lora(base, LoRAConfig(rank=4, targets=ALL)), size=2e-3)
    adapted = logits(model)
    requantized = merge_lora(copy.deepcopy(model), requantize=True)
    assert all(isinstance(requantized.blocks[i].attn.q, QuantLinear) for i in range(2))
    effect = (adapted - ref).abs().mean()
    assert (logits(requantized) - adapted).abs().mean() / effect > 0.2
    assert (logits(merge_lora(model)) - adapted).abs().mean() / effect < 1e-4


def test_adapters_round_trip_and_find_their_base(make, tiny_model, tmp_path):
    model = randomize_b(apply_lora(make("int8"), LoRAConfig(rank=4, targets=("q", "up"))))
    path = save_adapters(model, tmp_path / "a.safetensors")
    fresh = load_adapters(make("int8"), path)
    assert torch.equal(logits(fresh), logits(model))
    float_base = tiny_model("llama", V, seed=0, max_seq_len=16, tie_embeddings=False).eval()
    with pytest.raises(ValueError, match="int8-quantized base, this model is float"):
        load_adapters(float_base, path)
    with pytest.raises(ValueError, match="int8-quantized base, this model is int4-quantized"):
        load_adapters(make("int4"), path)
    # adapters of QLoRA from a float base (base_quant) quantize a float model the same way first
    cfg = LoRAConfig(rank=4, targets=("q", "up"), base_quant="int4")
    q = randomize_b(apply_lora(copy.deepcopy(float_base), cfg))
    path = save_adapters(q, tmp_path / "b.safetensors")
    again = load_adapters(copy.deepcopy(float_base), path)
    assert isinstance(again.blocks[0].attn.q, QuantLoRALinear)
    assert torch.equal(logits(again), logits(q))


def test_bad_combinations_are_clear_errors(make):
    with pytest.raises(ValueError, match="already quantized .* drop --lora.base_quant"):
        apply_lora(make("int8"), LoRAConfig(rank=4, base_quant="int4"))
    with pytest.raises(ValueError, match="target 'tok_emb' matches no module"):
        apply_lora(make("int8"), LoRAConfig(rank=4, targets=("tok_emb",)))


CONVS = [
    [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hi, you."}],
    [{"role": "user", "content": "One two"}, {"role": "assistant", "content": "three four."}],
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_model, tiny_tokenizer):
    """A float base and its int8-quantized copy (model dirs), and a chat file."""
    root = tmp_path_factory.mktemp("qlora")
    tok = tiny_tokenizer("bpe", [m["content"] for c in CONVS for m in c] * 10)
    model = tiny_model("llama", tok.vocab_size, d_model=64)
    save_model(model, root / "float", tok)
    save_model(quantize_model(model, QuantConfig(method="int8")), root / "int8", tok)
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    return root


def _sft(root, base, out, **lora):
    train = {"steps": 30, "batch_size": 2, "lr": 1e-2, "warmup_steps": 3, "precision": "fp32"}
    values = {
        "out_dir": str(root / out),
        "sft": {"base_model": str(root / base), "data": [str(root / "chat.jsonl")]},
        "train": train | {"eval_every": 1000, "ckpt_every": 1000, "log_every": 1000},
        "lora": lora,
    }
    values["sft"]["val_fraction"] = 0.0
    return sft(load_config(None, values), progress=False)


@pytest.fixture(scope="module")
def runs(dirs):
    """The same SFT (data, steps, seed) as LoRA over the float base, QLoRA over the int8 model
    dir, and QLoRA quantizing the float base to int4 on the fly: name -> (result, losses)."""
    lora = {"rank": 8, "targets": ["q", "k", "v", "o", "up", "gate", "down"]}
    out = {}
    for name, base, extra in [
        ("lora", "float", {}),
        ("int8", "int8", {}),
        ("int4", "float", {"base_quant": "int4"}),
    ]:
        result = _sft(dirs, base, f"run-{name}", **lora, **extra)
        log = (dirs / f"run-{name}/train_log.jsonl").read_text().splitlines()
        out[name] = result, [json.loads(x)["loss"] for x in log]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_qlora_sft_lowers_the_loss_like_lora_and_saves_a_model_that_generates(runs, dirs, name):
    result, losses = runs[name]
    lora_losses = runs["lora"][1]
    assert losses[-1] < 0.85 * losses[0] and abs(losses[-1] - lora_losses[-1]) < 0.05 * losses[0]
    assert result.info["lora"]["trainable"] == result.info["lora"]["adapter"]
    assert (dirs / f"run-{name}/adapters.safetensors").is_file()
    model = load_model(result.model_dir)  # the quantized base, its adapted layers merged in float
    assert set(quant_layers(model)) == {"tok_emb", "lm_head"}  # untied: both stay int8
    assert type(model.blocks[0].ffn.down) is nn.Linear
    out = Engine(model).generate([[3, 4, 5]], GenerateRequest(max_new_tokens=4))
    assert len(out[0]) == 4


def test_a_quantized_base_without_adapters_is_refused(dirs):
    with pytest.raises(ValueError, match="trains only through adapters .* --lora.rank"):
        _sft(dirs, "int8", "full")
    with pytest.raises(ValueError, match="trains only through adapters"):
        _sft(dirs, "float", "full2", base_quant="int8")
