"""HF decoders: the key maps and weight conversions between zerolm's decoder and HF's
GPT2LMHeadModel and the LLaMA family (Llama, Mistral, Qwen2, Qwen3ForCausalLM, one key map), and
GPT-2's config conversions (the LLaMA family's are in hf_llama_family.py)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch

from zerolm.config import ModelConfig
from zerolm.interop.hf_checkpoint import _refuse
from zerolm.interop.hf_llama_family import (
    FAMILY,
    FFN,
    QKV,
    hf_biases,
    llama_family_from_hf,
    llama_family_to_hf,
)
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
        "blocks.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_norm",  # qwen3
        "blocks.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_norm",
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
        qk_norm=(False,),
    ),
    "llama": dict(
        norm=("rmsnorm",),
        norm_placement=("pre",),
        position=("rope",),
        ffn=("swiglu",),
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


FROM_HF: dict[str, Callable[[dict], ModelConfig]] = {
    "gpt2": _gpt2_from_hf,
    **{t: partial(llama_family_from_hf, t) for t in FAMILY},
}
TO_HF: dict[str, Callable[[ModelConfig], dict]] = {
    "gpt2": _gpt2_to_hf,
    **{t: partial(llama_family_to_hf, model_type=t) for t in FAMILY},
}
KEY_FAMILY = {"gpt2": "gpt2", **dict.fromkeys(FAMILY, "llama")}  # model_type -> key map


# ------------------------------------------------------------------ weights


def _names(family: str, n_layers: int) -> dict[str, str]:
    """Every zerolm parameter name (with the virtual attn.qkv) -> its HF name."""
    out = {}
    for z, h in KEYS[family].items():
        for i in range(n_layers) if "{i}" in z else [0]:
            for s in ("weight", "bias"):
                out[f"{z.format(i=i)}.{s}"] = f"{h.format(i=i)}.{s}"
    return out


def _conv1d(family: str, name: str, t: torch.Tensor) -> bool:
    """GPT-2's block linears are Conv1D, stored (in, out): the transpose of nn.Linear."""
    return family == "gpt2" and name.startswith("blocks.") and t.dim() == 2


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    dh = cfg.head_dim
    return [cfg.n_heads * dh, cfg.n_kv_heads * dh, cfg.n_kv_heads * dh]


def _fit_biases(state: dict, n_layers: int, wanted: tuple[str, ...], where: str) -> None:
    """Make the block linears' biases those of `wanted` (zerolm part names), in place: an absent
    one is added as zeros (exact), a present one dropped if it is all zeros; a non-zero bias the
    target has no place for is an error."""
    for i in range(n_layers):
        for part in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down"):
            w, key = state.get(f"blocks.{i}.{part}.weight"), f"blocks.{i}.{part}.bias"
            if w is None:
                continue
            if part in wanted:
                state.setdefault(key, w.new_zeros(w.shape[0]))
            elif key in state and bool(state.pop(key).any()):
                raise ValueError(
                    f"{where} has no bias on {part}, but this model's {key} is not zero: export "
                    "a model without that bias (or as an architecture that has it)"
                )


def _split_qkv(state: dict, cfg: ModelConfig) -> None:
    """GPT-2's fused c_attn (attn.qkv) -> zerolm's attn.q, attn.k, attn.v, in place."""
    for i in range(cfg.n_layers):
        for s in ("weight", "bias"):
            fused = state.pop(f"blocks.{i}.attn.qkv.{s}", None)
            if fused is not None:
                q, k, v = fused.split(_qkv_sizes(cfg), dim=0)
                state.update({f"blocks.{i}.attn.{p}.{s}": t for p, t in zip("qkv", (q, k, v))})


def _from_hf_state(arch: str, hf_state: dict, cfg: ModelConfig) -> dict:
    family = KEY_FAMILY[arch]
    inverse = {h: z for z, h in _names(family, cfg.n_layers).items()}
    state, unknown = {}, []
    for name, t in hf_state.items():
        if name.endswith(IGNORED[family]):
            continue
        if not name.startswith((BASE[family] + ".", "lm_head.")):
            name = f"{BASE[family]}.{name}"
        if name not in inverse:
            unknown.append(name)
            continue
        z = inverse[name]
        state[z] = t.T.contiguous() if _conv1d(family, z, t) else t
    if unknown:
        raise ValueError(f"HF {arch} checkpoint has tensors zerolm cannot place: {unknown[:6]}")
    if cfg.tie_embeddings:  # a tied head is the embedding; some files store it anyway
        state.pop("lm_head.weight", None)
    _split_qkv(state, cfg)
    if family == "llama":  # e.g. attention_bias without mlp_bias: zerolm's other biases are zeros
        own = (QKV if cfg.qkv_bias else ()) + (("attn.o", *FFN) if cfg.bias else ())
        _fit_biases(state, cfg.n_layers, own, "zerolm")
    return state


def _to_hf_state(arch: str, model: Transformer, hf_config: dict) -> dict:
    family = KEY_FAMILY[arch]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    wanted = QKV + ("attn.o", *FFN) if family == "gpt2" else hf_biases(arch, hf_config)
    _fit_biases(state, model.cfg.n_layers, wanted, f"HF {arch}")
    for i in range(model.cfg.n_layers if family == "gpt2" else 0):
        for s in ("weight", "bias"):
            if all(f"blocks.{i}.attn.{p}.{s}" in state for p in "qkv"):
                state[f"blocks.{i}.attn.qkv.{s}"] = torch.cat(
                    [state.pop(f"blocks.{i}.attn.{p}.{s}") for p in "qkv"]
                )
    names = _names(family, model.cfg.n_layers)
    if stray := sorted(set(state) - set(names)):
        raise ValueError(
            f"model has tensors outside the plain {arch} architecture ({stray[:4]}): "
            "merge adapters / dequantize it before exporting"
        )
    return {
        names[k]: (t.T if _conv1d(family, k, t) else t).contiguous().cpu() for k, t in state.items()
    }
