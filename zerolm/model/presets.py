"""Architecture presets: each is a set of choices over the shared blocks.

`resolve(cfg)` fills the arch, the preset and every "preset"/None/0 field of a ModelConfig with the
preset's choice and checks the shape, so the rest of the model code only ever sees concrete values.
Presets and archs combine freely (an encoder-decoder with gpt2's pre-LN GELU blocks is
`--model.arch=encdec --model.preset=gpt2`); each arch has a default preset.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, cast

from zerolm.config import ModelConfig
from zerolm.model.rope import check_rope, yarn_attention_factor

if TYPE_CHECKING:

    class ResolvedModelConfig(ModelConfig):
        """A ModelConfig as resolve() returns it: every preset-dependent field concrete. For the
        type checker only: at run time it is ModelConfig itself, so configs compare, print and save
        exactly as before."""

        arch: Literal["decoder", "bert", "encdec"]
        preset: Literal["simple", "gpt2", "llama", "bert", "transformer"]
        norm: Literal["layernorm", "rmsnorm"]
        norm_placement: Literal["pre", "post"]
        position: Literal["learned", "sinusoidal", "rope"]
        ffn: Literal["relu", "gelu", "gelu_erf", "swiglu"]
        bias: bool
        qkv_bias: bool
        tie_embeddings: bool
        dropout: float
        norm_eps: float
        embed_norm: bool
        embed_scale: bool

else:
    ResolvedModelConfig = ModelConfig

PRESETS: dict[str, dict] = {
    # the classic teaching GPT: learned positions, post-LN norm(x + f(x)), ReLU FFN, dropout
    "simple": dict(
        norm="layernorm",
        norm_placement="post",
        position="learned",
        ffn="relu",
        bias=True,
        tie_embeddings=True,
        dropout=0.1,
        norm_eps=1e-5,
    ),
    # GPT-2: pre-LN LayerNorm, GELU (tanh), learned positions, tied embeddings, biases
    "gpt2": dict(
        norm="layernorm",
        norm_placement="pre",
        position="learned",
        ffn="gelu",
        bias=True,
        tie_embeddings=True,
        dropout=0.0,
        norm_eps=1e-5,
    ),
    # LLaMA: pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, untied head
    "llama": dict(
        norm="rmsnorm",
        norm_placement="pre",
        position="rope",
        ffn="swiglu",
        bias=False,
        tie_embeddings=False,
        dropout=0.0,
        norm_eps=1e-5,
    ),
    # BERT: post-LN, exact GELU, learned positions, a LayerNorm on the embeddings, MLM head tied
    "bert": dict(
        norm="layernorm",
        norm_placement="post",
        position="learned",
        ffn="gelu_erf",
        bias=True,
        tie_embeddings=True,
        dropout=0.1,
        norm_eps=1e-12,
        embed_norm=True,
    ),
    # the original Transformer (Vaswani et al. 2017): post-LN, ReLU, sinusoidal positions,
    # embeddings scaled by sqrt(d_model) and shared between encoder, decoder and output layer
    "transformer": dict(
        norm="layernorm",
        norm_placement="post",
        position="sinusoidal",
        ffn="relu",
        bias=True,
        tie_embeddings=True,
        dropout=0.1,
        norm_eps=1e-5,
        embed_scale=True,
    ),
}
ARCH_OF = {"bert": "bert", "transformer": "encdec"}  # a preset's arch when --model.arch is not set
DEFAULT_PRESET = {"decoder": "llama", "bert": "bert", "encdec": "transformer"}


def arch_of(cfg: ModelConfig) -> str:
    """The arch a (possibly unresolved) config builds: decoder, bert or encdec."""
    return cfg.arch or ARCH_OF.get(cfg.preset, "decoder")


def default_d_ff(d_model: int, ffn: str) -> int:
    if ffn == "swiglu":  # same parameter count as a 4*d two-matrix FFN, rounded for fast kernels
        return 32 * -(-(8 * d_model // 3) // 32)
    return 4 * d_model


def resolve(cfg: ModelConfig, vocab_size: int | None = None) -> ResolvedModelConfig:
    """A ModelConfig with every preset-dependent field concrete; raises ValueError on bad shapes."""
    arch = arch_of(cfg)
    name = cfg.preset or DEFAULT_PRESET[arch]
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    values = dataclasses.asdict(cfg) | {"arch": arch, "preset": name}
    for key, choice in {"embed_norm": False, "embed_scale": False, **PRESETS[name]}.items():
        if values[key] in ("preset", None):
            values[key] = choice
    if vocab_size and not values["vocab_size"]:
        values["vocab_size"] = vocab_size
    values["n_kv_heads"] = values["n_kv_heads"] or values["n_heads"]
    values["d_ff"] = values["d_ff"] or default_d_ff(values["d_model"], values["ffn"])
    d, h = values["d_model"], values["n_heads"]
    values["head_dim"] = values["head_dim"] or (d // h if h > 0 and d % h == 0 else 0)
    if values["qkv_bias"] is None:
        values["qkv_bias"] = values["bias"]
    if values["rope_scaling"] in ("llama3", "yarn") and not values["rope_original_max_len"]:
        values["rope_original_max_len"] = values["max_seq_len"]
    if values["rope_scaling"] == "yarn" and not values["rope_attention_factor"]:
        values["rope_attention_factor"] = yarn_attention_factor(values["rope_factor"])
    if arch == "encdec":
        values["n_decoder_layers"] = values["n_decoder_layers"] or values["n_layers"]
    out = cast(ResolvedModelConfig, ModelConfig(**values))  # every field above is concrete now
    check(out)
    return out


def head_size(cfg: ModelConfig) -> int:
    """Dh, the size of one attention head: model.head_dim, or d_model / n_heads when it is 0."""
    return cfg.head_dim or cfg.d_model // cfg.n_heads


def check(cfg: ResolvedModelConfig) -> None:
    d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    problems = [
        (
            cfg.vocab_size > 0,
            "model.vocab_size is unset: build the model with a tokenizer or set --model.vocab_size",
        ),
        (min(d, cfg.n_layers, h, cfg.max_seq_len, cfg.d_ff) > 0, "model sizes must be positive"),
        (
            dh > 0,
            f"model.n_heads={h} does not divide model.d_model={d}; pick n_heads from "
            f"{[x for x in range(1, min(d, 64) + 1) if d % x == 0]} or set model.head_dim",
        ),
        (
            h % kv == 0,
            f"model.n_kv_heads={kv} must divide model.n_heads={h} (grouped-query attention)",
        ),
        (
            cfg.position != "rope" or dh % 2 == 0,
            f"rope needs an even head size; got model.head_dim (or d_model/n_heads) = {dh}",
        ),
        *check_rope(cfg),
        (
            cfg.arch == "decoder"
            or (
                dh * h == d
                and cfg.qkv_bias == cfg.bias
                and not cfg.qk_norm
                and cfg.rope_scaling == "none"
            ),
            "model.head_dim, model.qkv_bias, model.qk_norm and model.rope_scaling apply to "
            f"decoders, not {cfg.arch}: leave them at their defaults",
        ),
        (cfg.position != "sinusoidal" or d % 2 == 0, "sinusoidal positions need an even d_model"),
        (0.0 <= cfg.dropout < 1.0, f"model.dropout must be in [0, 1), got {cfg.dropout}"),
        (cfg.sliding_window >= 0, "model.sliding_window must be >= 0"),
        (
            cfg.arch == "decoder" or cfg.sliding_window == 0,
            f"model.sliding_window applies to decoders, not {cfg.arch}",
        ),
        (
            cfg.arch != "decoder" or not (cfg.embed_norm or cfg.embed_scale),
            "model.embed_norm / model.embed_scale apply to bert and encdec models, not decoders",
        ),
        (
            cfg.arch != "bert" or cfg.type_vocab_size >= 1,
            "model.type_vocab_size must be >= 1 for bert",
        ),
        (cfg.n_decoder_layers >= 0, "model.n_decoder_layers must be >= 0 (0: n_layers)"),
    ]
    for ok, msg in problems:
        if not ok:
            raise ValueError(msg)
