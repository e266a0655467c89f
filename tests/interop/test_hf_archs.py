"""Every HF decoder architecture zerolm expresses (LLaMA with GQA, head_dim != d/h and rope
scaling, Mistral, Qwen2, Qwen3, GPT-2), against transformers on random weights: import, the KV-cache
decode, the decode layout and export back all give transformers' logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from zerolm.config import LoRAConfig, ModelConfig  # noqa: E402
from zerolm.config.load import load_config, parse_overrides  # noqa: E402
from zerolm.infer.kv_cache import KVCache  # noqa: E402
from zerolm.inspect.accounting import account  # noqa: E402
from zerolm.interop.hf import export_hf, import_hf  # noqa: E402
from zerolm.model import build_model  # noqa: E402
from zerolm.train.losses import lm_loss  # noqa: E402
from zerolm.transforms.layout import decode_layout  # noqa: E402
from zerolm.transforms.lora import apply_lora, merge_lora  # noqa: E402

V, D, L, H, T_MAX, SEQ = 300, 64, 2, 4, 32, 24
TOL = 1e-4
LLAMA = dict(intermediate_size=96, num_key_value_heads=2, rms_norm_eps=1e-5)
THETA = {"rope_theta": 100.0}  # short wavelengths: llama3's three bands all occur at Dh 16

# kind -> (transformers config class, its arguments, HF class the export must be)
CASES = {
    "llama-gqa-tied": ("LlamaConfig", dict(tie_word_embeddings=True), "LlamaForCausalLM"),
    "llama-untied-head_dim": ("LlamaConfig", dict(head_dim=24), "LlamaForCausalLM"),
    "llama-rope-linear": (
        "LlamaConfig",
        dict(rope_parameters={"rope_type": "linear", "factor": 2.0, **THETA}),
        "LlamaForCausalLM",
    ),
    "llama-rope-llama3": (
        "LlamaConfig",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                **THETA,
            }
        ),
        "LlamaForCausalLM",
    ),
    "llama-rope-yarn": (
        "LlamaConfig",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 8,
                **THETA,
            }
        ),
        "LlamaForCausalLM",
    ),
    "mistral-window": ("MistralConfig", dict(sliding_window=5), "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", {}, "Qwen2ForCausalLM"),
    "qwen2-window": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=0, head_dim=24),
        "Qwen2ForCausalLM",
    ),
    "qwen3": ("Qwen3Config", dict(head_dim=32), "Qwen3ForCausalLM"),
    "qwen3-bias-tied": (
        "Qwen3Config",
        dict(head_dim=16, attention_bias=True, tie_word_embeddings=True),
        "Qwen3ForCausalLM",
    ),
    "gpt2": ("GPT2Config", {}, "GPT2LMHeadModel"),
}


def _ids(batch=2, length=SEQ, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_config(kind: str):
    cls, kw, _ = CASES[kind]
    if cls == "GPT2Config":
        return transformers.GPT2Config(
            vocab_size=V,
            n_embd=D,
            n_layer=L,
            n_head=H,
            n_positions=T_MAX,
            bos_token_id=None,
            eos_token_id=None,
        )
    return getattr(transformers, cls)(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=H,
        max_position_embeddings=T_MAX,
        **{**LLAMA, **kw},
    )


def _save_hf(kind: str, path, spelling: str = "t5"):
    """A random transformers model of `kind` saved to `path`, reloaded from there (so it is what the
    files say); spelling t4 rewrites its rope as transformers 4's rope_scaling + rope_theta."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(kind))
    with torch.no_grad():  # HF inits norms to ones and biases to zeros: perturb them
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    if spelling == "t4":
        raw = json.loads((path / "config.json").read_text())
        rope = raw.pop("rope_parameters")
        raw["rope_theta"] = rope.pop("rope_theta")
        raw["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
        (path / "config.json").write_text(json.dumps(raw))
    return _load_hf(path)


def _load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return model.eval()


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _cached_logits(model, ids, prefill: int):
    """Prefill `prefill` tokens into a KV cache, then one token per step: logits (B, T, V)."""
    cache = KVCache.for_model(model, slots=ids.shape[0])
    out = [model(ids[:, :prefill], cache=cache)]
    out += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", list(CASES))
@torch.no_grad()
def test_import_decode_layout_and_export_match_transformers(kind, tmp_path):
    hf = _save_hf(kind, tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    ids = _ids()
    ref = hf(ids).logits
    got = model(ids)
    assert _diff(got, ref) <= TOL, f"import {kind}: {_diff(got, ref):.2e}"
    assert _diff(_cached_logits(model, ids, prefill=9), got) <= 1e-5
    fused = decode_layout(copy.deepcopy(model))
    assert _diff(fused(ids), got) <= 1e-5
    assert _diff(_cached_logits(fused, ids, prefill=9), got) <= 1e-5

    export_hf(model, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["architectures"] == [CASES[kind][2]]
    back = _load_hf(tmp_path / "out")
    assert _diff(back(ids).logits, ref) <= TOL
    assert import_hf(tmp_path / "out").cfg == model.cfg


def test_the_options_matter_to_the_parity():
    """Each case's option changes the logits, so the parity above checks it (not just defaults)."""
    ids = _ids()

    def logits(**kw):
        cfg = ModelConfig(preset="llama", d_model=D, n_layers=L, n_heads=H, max_seq_len=T_MAX)
        return build_model(ModelConfig(**{**cfg.__dict__, **kw}), vocab_size=V)(ids)

    with torch.no_grad():
        base = logits()
        for kw in [
            dict(rope_scaling="linear", rope_factor=2.0),
            dict(rope_scaling="llama3", rope_factor=4.0, rope_original_max_len=8),
            dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=8),
            dict(sliding_window=5),
        ]:
            assert _diff(logits(**kw), base) > 1e-3, kw


@pytest.mark.parametrize("kind", ["llama-rope-linear", "llama-rope-llama3", "llama-rope-yarn"])
@torch.no_grad()
def test_transformers_4_rope_scaling_spelling(kind, tmp_path):
    hf = _save_hf(kind, tmp_path, spelling="t4")
    assert "rope_scaling" in json.loads((tmp_path / "config.json").read_text())
    ids = _ids()
    assert _diff(import_hf(tmp_path)(ids), hf(ids).logits) <= TOL


@torch.no_grad()
def test_yarn_mscale_and_untruncated_range(tmp_path):
    """yarn's attention factor from mscale / mscale_all_dim, and truncate=false."""
    cfg = _hf_config("llama-rope-yarn")
    # beta_fast 2 over 16 positions: a fractional correction range, which truncation would round
    cfg.rope_parameters.update(
        mscale=2.0,
        mscale_all_dim=1.0,
        truncate=False,
        beta_fast=2.0,
        original_max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    hf = _load_hf(tmp_path)
    model = import_hf(tmp_path)
    assert not model.cfg.rope_truncate and model.cfg.rope_attention_factor > 1.0
    ids = _ids()
    assert _diff(model(ids), hf(ids).logits) <= TOL


def _hf_dir(tmp_path, kind: str, **changes):
    """A saved `kind` checkpoint whose config.json has `changes` (None deletes a key)."""
    _save_hf(kind, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize(
    "kind, changes, message",
    [
        ("llama-gqa-tied", {"model_type": "phi3"}, r"'phi3'.*llama, mistral, qwen2, qwen3"),
        (
            "llama-gqa-tied",
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            r"rope_type='dynamic' \(supported: default, linear, llama3, yarn\)",
        ),
        (
            "llama-gqa-tied",
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            r"rope_type='longrope'",
        ),
        ("qwen2", {"hidden_act": "gelu"}, r"hidden_act='gelu' \(supported: 'silu'\)"),
        ("qwen2", {"mlp_bias": True}, r"mlp_bias \(supported: llama only\)"),
        (
            "qwen2",
            {
                "use_sliding_window": True,
                "sliding_window": 4,
                "layer_types": None,
                "max_window_layers": 1,
            },
            r"sliding window on some layers only",
        ),
        ("llama-gqa-tied", {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5"),
    ],
)
def test_unsupported_hf_configs_are_one_line_errors(tmp_path, kind, changes, message):
    with pytest.raises(ValueError, match=message) as err:
        import_hf(_hf_dir(tmp_path, kind, **changes))
    assert "\n" not in str(err.value)


def test_export_refuses_biases_the_architecture_has_no_place_for(tmp_path):
    cfg = ModelConfig(
        preset="llama", d_model=D, n_layers=L, n_heads=H, max_seq_len=T_MAX, qk_norm=True, bias=True
    )
    model = build_model(cfg, vocab_size=V)
    with torch.no_grad():
        model.blocks[0].ffn.up.bias.fill_(0.5)
    with pytest.raises(ValueError, match=r"HF qwen3 has no bias on ffn.up"):
        export_hf(model, tmp_path)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(preset="gpt2", rope_scaling="yarn", rope_factor=2.0), r"needs model.position='rope'"),
        (dict(rope_factor=2.0), r"rope_factor applies only with model.rope_scaling"),
        (dict(rope_scaling="linear", rope_factor=0.5), r"rope_factor must be >= 1"),
        (dict(preset="bert", qk_norm=True), r"apply to decoders, not bert"),
        (dict(head_dim=15), r"rope needs an even head size"),
        (dict(n_heads=3), r"set model.head_dim"),
    ],
)
def test_bad_new_model_keys_are_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(**{"d_model": D, "n_layers": 1, **kw}), vocab_size=V)


def test_zerolm_training_uses_the_new_keys():
    """The options are ordinary --model.* keys: a model built from them trains (grads reach the
    q/k norms and q/k/v biases) and exports as the HF architecture that has them."""
    cfg = load_config(
        overrides=parse_overrides(
            [
                "--model.qk_norm=true",
                "--model.qkv_bias=true",
                "--model.head_dim=24",
                "--model.rope_scaling=yarn",
                "--model.rope_factor=2",
                f"--model.d_model={D}",
                "--model.n_layers=2",
                f"--model.max_seq_len={T_MAX}",
            ]
        )
    ).model
    model = build_model(cfg, vocab_size=V, seed=0).train()
    attn = model.blocks[0].attn
    assert (attn.dh, attn.q.out_features, attn.q.bias is not None) == (24, 24 * 4, True)
    assert attn.o.bias is None and attn.q_norm is not None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = _ids(length=T_MAX)
    batch = (ids[:, :-1], ids[:, 1:])
    losses = []
    for _ in range(3):
        loss = lm_loss(model, batch).loss
        opt.zero_grad()
        loss.backward()
        assert attn.q_norm.weight.grad.abs().sum() > 0 and attn.k.bias.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@torch.no_grad()
def test_lora_and_accounting_of_an_imported_qwen3(tmp_path):
    """LoRA on a model with q/k norms and head_dim != d/h: trained adapters merge to the same
    logits, the merged model exports; the accounting counts H·Dh-wide attention."""
    _save_hf("qwen3", tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    a = account(model, context=T_MAX)
    dh, kv = model.cfg.head_dim, model.cfg.n_kv_heads
    assert a["kv_cache_bytes"] == 2 * L * kv * T_MAX * dh * 4
    assert a["parameters"]["attention"] == L * (2 * D * (H + kv) * dh + 2 * dh)
    apply_lora(model, LoRAConfig(rank=4))
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = _ids()
    unmerged = model(ids)
    merged = merge_lora(model)
    assert _diff(merged(ids), unmerged) <= 1e-5
    export_hf(merged, tmp_path / "out")
    assert _diff(_load_hf(tmp_path / "out")(ids).logits, unmerged) <= TOL


@pytest.mark.slow
@torch.no_grad()
def test_compiled_decode_of_an_imported_qwen3(tmp_path):
    """The AOT-compiled decode step (qk_norm, head_dim != d/h, yarn, a window) gives the eager
    engine's tokens."""
    from zerolm.infer.engine import Engine, GenerateRequest
    from zerolm.infer.sampling import SamplingParams

    cfg = _hf_config("qwen3")
    cfg.rope_parameters = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "rope_theta": 100.0,
    }
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 6, 0
    cfg.layer_types = ["sliding_attention"] * L
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = decode_layout(import_hf(tmp_path / "hf"))
    assert model.cfg.sliding_window == 6 and model.cfg.rope_scaling == "yarn"
    req = GenerateRequest(max_new_tokens=12, sampling=SamplingParams(temperature=0))
    prompt = [[5, 6, 7, 8, 9]]
    eager = Engine(model).generate(prompt, req)
    compiled = Engine(model, compile=True, program_dir=str(tmp_path / "programs"))
    assert compiled.generate(prompt, req) == eager
