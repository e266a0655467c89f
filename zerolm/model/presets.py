"""Architecture presets: each is a set of choices over the shared blocks.

`resolve(cfg)` fills every "preset"/None/0 field of a ModelConfig with the preset's choice and
checks the shape, so the rest of the model code only ever sees concrete values.
"""
from __future__ import annotations

import dataclasses

from zerolm.config import ModelConfig

PRESETS: dict[str, dict] = {
    # the classic teaching GPT: learned positions, post-LN norm(x + f(x)), ReLU FFN, dropout
    "simple": dict(norm="layernorm", norm_placement="post", position="learned", ffn="relu", bias=True,
                   tie_embeddings=True, dropout=0.1, norm_eps=1e-5),
    # GPT-2: pre-LN LayerNorm, GELU (tanh), learned positions, tied embeddings, biases
    "gpt2": dict(norm="layernorm", norm_placement="pre", position="learned", ffn="gelu", bias=True,
                 tie_embeddings=True, dropout=0.0, norm_eps=1e-5),
    # LLaMA: pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, untied head
    "llama": dict(norm="rmsnorm", norm_placement="pre", position="rope", ffn="swiglu", bias=False,
                  tie_embeddings=False, dropout=0.0, norm_eps=1e-5),
}


def default_d_ff(d_model: int, ffn: str) -> int:
    if ffn == "swiglu":  # same parameter count as a 4*d two-matrix FFN, rounded for fast kernels
        return 32 * -(-(8 * d_model // 3) // 32)
    return 4 * d_model


def resolve(cfg: ModelConfig, vocab_size: int | None = None) -> ModelConfig:
    """A ModelConfig with every preset-dependent field concrete; raises ValueError on bad shapes."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown model preset {cfg.preset!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[cfg.preset]
    values = dataclasses.asdict(cfg)
    for key, choice in preset.items():
        if values[key] in ("preset", None):
            values[key] = choice
    if vocab_size and not values["vocab_size"]:
        values["vocab_size"] = vocab_size
    values["n_kv_heads"] = values["n_kv_heads"] or values["n_heads"]
    values["d_ff"] = values["d_ff"] or default_d_ff(values["d_model"], values["ffn"])
    out = ModelConfig(**values)
    check(out)
    return out


def check(cfg: ModelConfig) -> None:
    d, h, kv = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
    problems = [
        (cfg.vocab_size > 0, "model.vocab_size is unset: build the model with a tokenizer or set --model.vocab_size"),
        (min(d, cfg.n_layers, h, cfg.max_seq_len, cfg.d_ff) > 0, "model sizes must be positive"),
        (d % h == 0, f"model.n_heads={h} does not divide model.d_model={d}; pick n_heads from "
                     f"{[x for x in range(1, min(d, 64) + 1) if d % x == 0]}"),
        (h % kv == 0, f"model.n_kv_heads={kv} must divide model.n_heads={h} (grouped-query attention)"),
        (cfg.position != "rope" or (d // h) % 2 == 0, f"rope needs an even head size; d_model/n_heads = {d // h}"),
        (cfg.position != "sinusoidal" or d % 2 == 0, "sinusoidal positions need an even d_model"),
        (0.0 <= cfg.dropout < 1.0, f"model.dropout must be in [0, 1), got {cfg.dropout}"),
        (cfg.sliding_window >= 0, "model.sliding_window must be >= 0"),
    ]
    for ok, msg in problems:
        if not ok:
            raise ValueError(msg)
