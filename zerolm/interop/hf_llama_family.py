"""The LLaMA family of HF decoders (model_type llama, mistral, qwen2, qwen3): one zerolm preset
(llama) whose options (head_dim, qkv_bias, qk_norm, sliding_window, rope scaling) say which of them
a config is. Config conversions both ways and the choice of HF architecture on export; the weights
share one key map (hf_decoder.py)."""

from __future__ import annotations

import math

from zerolm.config import ModelConfig
from zerolm.interop.hf_checkpoint import _refuse

FAMILY = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# transformers' config defaults for keys a hand-written config.json may leave out
COMMON = dict(
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
    attention_dropout=0.0,
    rope_theta=10000.0,
    attention_bias=False,
    mlp_bias=False,
)
QWEN = dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768)
DEFAULTS = {
    "llama": COMMON,
    "mistral": {
        **COMMON,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
    },
    "qwen2": {**COMMON, **QWEN},
    "qwen3": {**COMMON, **QWEN, "head_dim": 128},
}
# the keys each rope type reads (transformers' modeling_rope_utils), beyond rope_type/rope_theta
ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
}
ROPE_NEEDS = {"linear": {"factor"}, "llama3": {"factor", "low_freq_factor", "high_freq_factor"}}
QKV, OUT = ("attn.q", "attn.k", "attn.v"), ("attn.o",)
FFN = ("ffn.gate", "ffn.up", "ffn.down")


def hf_biases(model_type: str, c: dict) -> tuple[str, ...]:
    """The block linears (zerolm names) that carry a bias in this HF architecture and config."""
    if model_type == "qwen2":
        return QKV
    if model_type == "mistral":
        return ()
    mlp = FFN if model_type == "llama" and c.get("mlp_bias") else ()
    return (QKV + OUT if c.get("attention_bias") else ()) + mlp


# ------------------------------------------------------------------ rope


def _yarn_attention_factor(rope: dict, factor: float) -> float:
    """transformers' default: mscale ratio if both mscale keys are set, else 0.1 ln(f) + 1."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


def rope_from_hf(c: dict) -> dict:
    """The zerolm rope_* keys of an HF config: transformers 4's `rope_scaling` + top-level
    `rope_theta`, or transformers 5's `rope_parameters` (rope_scaling wins, as there)."""
    rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    theta = float(rope.pop("rope_theta", c["rope_theta"]))
    nested = any(isinstance(v, dict) for v in rope.values())
    stray = sorted(set(rope) - ROPE_KEYS.get(kind, set()) - {"partial_rotary_factor"})
    missing = sorted(ROPE_NEEDS.get(kind, set()) - set(rope))
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor")) or 1.0
    _refuse(
        "rope",
        [
            (
                kind in ROPE_KEYS,
                f"rope_type={kind!r} (supported: {', '.join(ROPE_KEYS)})",
            ),
            (not nested, "rope parameters per layer type (supported: one set for all layers)"),
            (not stray or kind not in ROPE_KEYS, f"rope keys {stray} for rope_type={kind!r}"),
            (partial == 1.0, f"partial_rotary_factor={partial} (supported: 1.0)"),
            (not missing, f"rope_type={kind!r} without {missing}"),
        ],
    )
    out: dict = {"rope_theta": theta}
    if kind == "default":
        return out
    max_pos = c["max_position_embeddings"]
    orig = int(
        c.get("original_max_position_embeddings")
        or rope.get("original_max_position_embeddings")
        or max_pos
    )
    factor = float(rope.get("factor") or max_pos / orig)  # yarn's default; the others need one
    out.update(rope_scaling=kind, rope_factor=factor)
    if kind == "llama3":
        out.update(
            rope_original_max_len=orig,
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
        )
    elif kind == "yarn":
        out.update(
            rope_original_max_len=orig,
            rope_beta_fast=float(rope.get("beta_fast") or 32),
            rope_beta_slow=float(rope.get("beta_slow") or 1),
            rope_attention_factor=_yarn_attention_factor(rope, factor),
            rope_truncate=bool(rope.get("truncate", True)),
        )
    return out


def rope_to_hf(cfg: ModelConfig) -> dict:
    """rope_theta, rope_scaling (transformers 4) and rope_parameters (transformers 5)."""
    kind = cfg.rope_scaling
    scaling: dict = {"rope_type": "default" if kind == "none" else kind}
    if kind != "none":
        scaling["factor"] = cfg.rope_factor
    if kind == "llama3":
        scaling.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    elif kind == "yarn":
        scaling.update(
            original_max_position_embeddings=cfg.rope_original_max_len,
            beta_fast=cfg.rope_beta_fast,
            beta_slow=cfg.rope_beta_slow,
            attention_factor=float(cfg.rope_attention_factor),
            truncate=cfg.rope_truncate,
        )
    return dict(
        rope_theta=cfg.rope_theta,
        rope_scaling=None if kind == "none" else scaling,
        rope_parameters={**scaling, "rope_theta": cfg.rope_theta},
    )


# ------------------------------------------------------------------ configs


def _sliding_window(model_type: str, raw: dict) -> int:
    """Mistral: `sliding_window` (null: none). Qwen2/3: only with use_sliding_window, on the layers
    from max_window_layers on (layer_types); zerolm has one window for all layers or none."""
    w = raw.get("sliding_window", 4096)  # null means none: read from raw, not the defaults
    if model_type == "mistral":
        return int(w or 0)
    if model_type not in ("qwen2", "qwen3") or not raw.get("use_sliding_window") or not w:
        return 0
    first = raw.get("max_window_layers", 28)
    types = raw.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention"
        for i in range(raw.get("num_hidden_layers", 32))
    ]
    sliding = {t == "sliding_attention" for t in types}
    _refuse(
        model_type,
        [(len(sliding) == 1, "sliding window on some layers only (supported: all or none)")],
    )
    return int(w) if sliding == {True} else 0


def llama_family_from_hf(model_type: str, raw: dict) -> ModelConfig:
    c = {**DEFAULTS[model_type], **{k: v for k, v in raw.items() if v is not None}}
    d, h = c["hidden_size"], c["num_attention_heads"]
    _refuse(
        model_type,
        [
            (c["hidden_act"] == "silu", f"hidden_act={c['hidden_act']!r} (supported: 'silu')"),
            # transformers would ignore it and build no FFN biases: surely not what was meant
            (model_type == "llama" or not raw.get("mlp_bias"), "mlp_bias (supported: llama only)"),
        ],
    )
    biases = hf_biases(model_type, c)  # as transformers builds them: mistral/qwen2 ignore the keys
    return ModelConfig(
        preset="llama",
        vocab_size=c["vocab_size"],
        d_model=d,
        n_layers=c["num_hidden_layers"],
        n_heads=h,
        n_kv_heads=c["num_key_value_heads"] or h,
        head_dim=c["head_dim"] or d // h,
        d_ff=c["intermediate_size"],
        max_seq_len=c["max_position_embeddings"],
        norm_eps=float(c["rms_norm_eps"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        bias=any(p in biases for p in OUT + FFN),  # zerolm fills the biases HF lacks with zeros
        qkv_bias=QKV[0] in biases,
        qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window(model_type, raw),
        dropout=float(c["attention_dropout"]),
        **rope_from_hf(c),
    )


def export_type(cfg: ModelConfig) -> str:
    """The HF architecture that expresses a llama-preset config: q/k norms -> Qwen3, biases on
    q/k/v only -> Qwen2, a sliding window -> Mistral, else LLaMA."""
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def llama_family_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    out = dict(
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.dropout,
        **rope_to_hf(cfg),
    )
    if model_type in ("llama", "qwen3"):
        out["attention_bias"] = bool(cfg.bias or cfg.qkv_bias)
    if model_type == "llama":
        out["mlp_bias"] = bool(cfg.bias)
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window or None
    if model_type in ("qwen2", "qwen3"):  # the window on every layer, or none
        out.update(
            use_sliding_window=bool(cfg.sliding_window),
            sliding_window=cfg.sliding_window or None,
            max_window_layers=0 if cfg.sliding_window else cfg.n_layers,
            layer_types=["sliding_attention" if cfg.sliding_window else "full_attention"]
            * cfg.n_layers,
        )
    return out
