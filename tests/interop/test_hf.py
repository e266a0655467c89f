"""HF transformers as the reference: imported / exported weights give the same logits and tokens."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from zerolm.config import ModelConfig  # noqa: E402
from zerolm.interop.hf import export_hf, import_hf  # noqa: E402
from zerolm.model import build_model  # noqa: E402

V, D, L, H, T_MAX = 300, 64, 2, 4, 32
TOL = 1e-4


def _ids(batch=2, length=20, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V,
            n_embd=D,
            n_layer=L,
            n_head=H,
            n_positions=T_MAX,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
            attn_implementation="eager",
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=2,
            intermediate_size=96,
            max_position_embeddings=T_MAX,
            rope_theta=5000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=kind == "llama-tied",
            attention_bias=kind == "llama-bias",
            attn_implementation="eager",
        )
        model = transformers.LlamaForCausalLM(cfg)
    with (
        torch.no_grad()
    ):  # HF inits norms to ones and biases to zeros: perturb them so they are tested
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-tied", "llama-bias"])
def test_import_matches_hf_logits(kind, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = import_hf(tmp_path / "hf")
    assert model.cfg.preset == ("gpt2" if kind == "gpt2" else "llama")
    ids = _ids()
    with torch.no_grad():
        diff = _max_diff(model(ids), _hf_logits(hf, ids))
    print(f"import {kind}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_import_sharded_and_headless(tmp_path):
    """A sharded llama (model.safetensors.index.json) and a headless GPT2Model (no `transformer.`
    prefix)."""
    llama = _hf_model("llama")
    llama.save_pretrained(tmp_path / "llama", safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file()
    gpt2 = _hf_model("gpt2")
    gpt2.transformer.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(import_hf(tmp_path / "llama")(ids), _hf_logits(llama, ids)) <= TOL
        assert _max_diff(import_hf(tmp_path / "gpt2")(ids), _hf_logits(gpt2, ids)) <= TOL


def test_import_writes_zerolm_dir_with_tokenizer(tmp_path, tiny_tokenizer):
    from zerolm.model import load_model

    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tiny_tokenizer().save(tmp_path / "hf")  # checked on import: it must load
    model = import_hf(tmp_path / "hf", out_dir=tmp_path / "z")
    assert (tmp_path / "z" / "tokenizer.json").read_bytes() == (
        tmp_path / "hf" / "tokenizer.json"
    ).read_bytes()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "z")(ids), model(ids))


def _zerolm_model(preset: str, **kw):
    cfg = ModelConfig(
        preset=preset,
        d_model=D,
        n_layers=L,
        n_heads=H,
        max_seq_len=T_MAX,
        n_kv_heads=2 if preset == "llama" else 0,
        **kw,
    )
    model = build_model(cfg, vocab_size=V, seed=0)
    with torch.no_grad():  # zero biases / unit norms from init would hide a bias or norm mix-up
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(
                    0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
                )
    return model.eval()


@pytest.mark.parametrize(
    "preset,kw",
    [
        ("gpt2", {}),
        ("gpt2", {"tie_embeddings": False}),
        ("llama", {}),
        ("llama", {"tie_embeddings": True, "bias": True}),
    ],
)
def test_export_loads_in_hf_and_round_trips(preset, kw, tmp_path):
    model = _zerolm_model(preset, **kw)
    export_hf(model, tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager"
    )
    assert (
        not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ), info
    assert type(hf).__name__ == ("LlamaForCausalLM" if preset == "llama" else "GPT2LMHeadModel")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
        diff = _max_diff(ref, _hf_logits(hf.eval(), ids))
        back = import_hf(tmp_path / "hf")
        assert back.cfg == model.cfg
        assert torch.equal(back(ids), ref)
    print(f"export {preset} {kw}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_export_writes_tokenizer_ids_and_rope_theta(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer(
        "bpe", ["the quick brown fox jumps over the lazy dog. " * 20], vocab_size=V
    )
    model = _zerolm_model("llama", rope_theta=5000.0)
    export_hf(model, tmp_path, tokenizer=tok)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1, 2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1, 2)
    text = "the lazy fox"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    rope = getattr(hf_cfg, "rope_parameters", None) or {"rope_theta": hf_cfg.rope_theta}
    assert rope["rope_theta"] == 5000.0


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_generate_matches_hf(kind, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = import_hf(tmp_path)
    prompt = _ids(batch=1, length=6, seed=3)
    hf.generation_config.eos_token_id = None  # never stop early: compare all 10 tokens
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = hf.generate(
            prompt, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt)
        )
        ids = prompt
        for _ in range(10):  # full recomputation, no cache
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert ids.tolist() == want.tolist()


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=r"'t5'.*gpt2, llama, mistral, qwen2, qwen3, bert"):
        import_hf(tmp_path)


def test_export_refuses_post_norm(tmp_path):
    model = build_model(
        ModelConfig(preset="simple", d_model=D, n_layers=L, n_heads=H, max_seq_len=T_MAX),
        vocab_size=V,
    )
    with pytest.raises(ValueError, match="norm_placement='post'"):
        export_hf(model, tmp_path)


def test_export_refuses_sinusoidal_llama_mix(tmp_path):
    model = build_model(
        ModelConfig(
            preset="gpt2",
            position="sinusoidal",
            d_model=D,
            n_layers=L,
            n_heads=H,
            max_seq_len=T_MAX,
        ),
        vocab_size=V,
    )
    with pytest.raises(ValueError, match="position='sinusoidal'"):
        export_hf(model, tmp_path)


def test_pickle_only_checkpoint_refused(tmp_path):
    hf = _hf_model("gpt2")
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        import_hf(tmp_path)
