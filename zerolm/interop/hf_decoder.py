"""GPT-2 and LLaMA: the key maps, config conversions and weight conversions between zerolm's
decoder and HF's GPT2LMHeadModel / LlamaForCausalLM."""

from __future__ import annotations

from typing import Literal

import torch

from zerolm.config import ModelConfig
from zerolm.interop.hf_checkpoint import _refuse
from zerolm.model import Transformer

# zerolm module -> HF module; each maps its .weight and .bias. `attn.qkv` is GPT-2's fused c_attn.
KEYS = {
    "gpt2": {
        "tok_emb": "transformer.wte",
        "pos_emb": "transformer.wpe",
        "norm_f": "transformer.ln_f",
        "lm_head": "lm_head",
        "blocks.{i}.norm1": "transformer.h.{i}.ln_1",
        "blocks.{i}.attn.qkv": "transformer.h.{i}.attn.c_attn",
        "blocks.{i}.attn.o": "transformer.h.{i}.attn.c_proj",
        "blocks.{i}.norm2": "transformer.h.{i}.ln_2",
        "blocks.{i}.ffn.up": "transformer.h.{i}.mlp.c_fc",
        "blocks.{i}.ffn.down": "transformer.h.{i}.mlp.c_proj",
    },
    "llama": {
        "tok_emb": "model.embed_tokens",
        "norm_f": "model.norm",
        "lm_head": "lm_head",
        "blocks.{i}.norm1": "model.layers.{i}.input_layernorm",
        **{f"blocks.{{i}}.attn.{p}": f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkvo"},
        "blocks.{i}.norm2": "model.layers.{i}.post_attention_layernorm",
        **{
            f"blocks.{{i}}.ffn.{p}": f"model.layers.{{i}}.mlp.{p}_proj"
            for p in ("gate", "up", "down")
        },
    },
}
BASE = {"gpt2": "transformer", "llama": "model"}  # prefix a headless base-model checkpoint lacks
IGNORED = {
    "gpt2": (".attn.bias", ".attn.masked_bias"),
    "llama": (".rotary_emb.inv_freq",),
}  # HF buffers

# what an HF architecture fixes: a zerolm model must take one of these values to be exported
REQUIRED: dict[str, dict[str, tuple]] = {
    "gpt2": dict(
        norm=("layernorm",),
        norm_placement=("pre",),
        position=("learned",),
        ffn=("gelu", "relu"),
        bias=(True,),
        sliding_window=(0,),
    ),
    "llama": dict(
        norm=("rmsnorm",),
        norm_placement=("pre",),
        position=("rope",),
        ffn=("swiglu",),
        sliding_window=(0,),
    ),
}
GPT2_DEFAULTS = dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_inner=None,
    activation_function="gelu_new",
    resid_pdrop=0.1,
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=True,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    add_cross_attention=False,
)
LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    head_dim=None,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
    rope_theta=10000.0,
)
GPT2_ACT: dict[str, Literal["gelu", "relu"]] = {
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "relu": "relu",
}


# ------------------------------------------------------------------ configs, per architecture


def _gpt2_from_hf(raw: dict) -> ModelConfig:
    c = {**GPT2_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    act = c["activation_function"]
    _refuse(
        "gpt2",
        [
            (act in GPT2_ACT, f"activation_function={act!r} (supported: {', '.join(GPT2_ACT)})"),
            (c["scale_attn_weights"], "scale_attn_weights=false"),
            (not c["scale_attn_by_inverse_layer_idx"], "scale_attn_by_inverse_layer_idx=true"),
            (not c["add_cross_attention"], "add_cross_attention=true"),
        ],
    )
    return ModelConfig(
        preset="gpt2",
        vocab_size=c["vocab_size"],
        d_model=c["n_embd"],
        n_layers=c["n_layer"],
        n_heads=c["n_head"],
        d_ff=c["n_inner"] or 4 * c["n_embd"],
        max_seq_len=c["n_positions"],
        ffn=GPT2_ACT[act],  # _refuse checked it
        norm_eps=float(c["layer_norm_epsilon"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        dropout=float(c["resid_pdrop"]),
    )


def _gpt2_to_hf(cfg: ModelConfig) -> dict:
    return dict(
        architectures=["GPT2LMHeadModel"],
        model_type="gpt2",
        vocab_size=cfg.vocab_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        n_positions=cfg.max_seq_len,
        activation_function="gelu_new" if cfg.ffn == "gelu" else "relu",
        layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        scale_attn_weights=True,
    )


def _llama_from_hf(raw: dict) -> ModelConfig:
    c = {**LLAMA_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    # transformers 5 keeps rope_theta in rope_parameters; 4.x at top level, scaling in rope_scaling
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    d, h = c["hidden_size"], c["num_attention_heads"]
    _refuse(
        "llama",
        [
            (rope_type == "default", f"rope_type={rope_type!r} (only 'default' RoPE is supported)"),
            (c["hidden_act"] == "silu", f"hidden_act={c['hidden_act']!r} (only 'silu')"),
            (
                c["head_dim"] in (None, d // h),
                f"head_dim={c['head_dim']} != hidden_size/heads={d // h}",
            ),
        ],
    )
    return ModelConfig(
        preset="llama",
        vocab_size=c["vocab_size"],
        d_model=d,
        n_layers=c["num_hidden_layers"],
        n_heads=h,
        n_kv_heads=c["num_key_value_heads"] or h,
        d_ff=c["intermediate_size"],
        max_seq_len=c["max_position_embeddings"],
        norm_eps=float(c["rms_norm_eps"]),
        rope_theta=float(rope.get("rope_theta", c["rope_theta"])),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        bias=bool(c["attention_bias"] or c["mlp_bias"]),
        dropout=float(c["attention_dropout"]),
    )


def _llama_to_hf(cfg: ModelConfig) -> dict:
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,  # both spellings: transformers 4 and 5
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        attention_dropout=cfg.dropout,
    )


FROM_HF = {"gpt2": _gpt2_from_hf, "llama": _llama_from_hf}
TO_HF = {"gpt2": _gpt2_to_hf, "llama": _llama_to_hf}


# ------------------------------------------------------------------ weights


def _names(arch: str, n_layers: int) -> dict[str, str]:
    """Every zerolm parameter name (with the virtual attn.qkv) -> its HF name."""
    out = {}
    for z, h in KEYS[arch].items():
        for i in range(n_layers) if "{i}" in z else [0]:
            for s in ("weight", "bias"):
                out[f"{z.format(i=i)}.{s}"] = f"{h.format(i=i)}.{s}"
    return out


def _conv1d(arch: str, name: str, t: torch.Tensor) -> bool:
    """GPT-2's block linears are Conv1D, stored (in, out): the transpose of nn.Linear."""
    return arch == "gpt2" and name.startswith("blocks.") and t.dim() == 2


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    dh = cfg.d_model // cfg.n_heads
    return [cfg.n_heads * dh, cfg.n_kv_heads * dh, cfg.n_kv_heads * dh]


def _from_hf_state(arch: str, hf_state: dict, cfg: ModelConfig) -> dict:  # noqa: C901 (one branch per HF layout difference)
    inverse = {h: z for z, h in _names(arch, cfg.n_layers).items()}
    state, unknown = {}, []
    for name, t in hf_state.items():
        if name.endswith(IGNORED[arch]):
            continue
        if not name.startswith((BASE[arch] + ".", "lm_head.")):
            name = f"{BASE[arch]}.{name}"
        if name not in inverse:
            unknown.append(name)
            continue
        z = inverse[name]
        state[z] = t.T.contiguous() if _conv1d(arch, z, t) else t
    if unknown:
        raise ValueError(f"HF {arch} checkpoint has tensors zerolm cannot place: {unknown[:6]}")
    if cfg.tie_embeddings:
        state.pop(
            "lm_head.weight", None
        )  # a tied head is the embedding; some files store it anyway
    for i in range(cfg.n_layers):
        for s in ("weight", "bias"):
            fused = state.pop(f"blocks.{i}.attn.qkv.{s}", None)
            if fused is not None:
                q, k, v = fused.split(_qkv_sizes(cfg), dim=0)
                state.update(
                    {
                        f"blocks.{i}.attn.q.{s}": q,
                        f"blocks.{i}.attn.k.{s}": k,
                        f"blocks.{i}.attn.v.{s}": v,
                    }
                )
    if (
        arch == "llama" and cfg.bias
    ):  # attention_bias != mlp_bias: zerolm has both, the absent ones are zeros
        for i in range(cfg.n_layers):
            for p in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down"):
                w = state.get(f"blocks.{i}.{p}.weight")
                if w is not None:
                    state.setdefault(f"blocks.{i}.{p}.bias", w.new_zeros(w.shape[0]))
    return state


def _to_hf_state(arch: str, model: Transformer) -> dict:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for i in range(model.cfg.n_layers if arch == "gpt2" else 0):
        for s in ("weight", "bias"):
            if all(f"blocks.{i}.attn.{p}.{s}" in state for p in "qkv"):
                state[f"blocks.{i}.attn.qkv.{s}"] = torch.cat(
                    [state.pop(f"blocks.{i}.attn.{p}.{s}") for p in "qkv"]
                )
    names = _names(arch, model.cfg.n_layers)
    if stray := sorted(set(state) - set(names)):
        raise ValueError(
            f"model has tensors outside the plain {arch} architecture ({stray[:4]}): "
            "merge adapters / dequantize it before exporting"
        )
    return {
        names[k]: (t.T if _conv1d(arch, k, t) else t).contiguous().cpu() for k, t in state.items()
    }
