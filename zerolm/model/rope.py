"""RoPE tables: the inverse frequencies of each head dimension pair, optionally rescaled for a
context beyond pretraining (linear, llama3, yarn), as transformers' modeling_rope_utils computes
them, so imported checkpoints rotate identically. Pure functions of a resolved model config.

Legend: n positions, Dh head size.
"""

from __future__ import annotations

import math

import torch

from zerolm.config import ModelConfig

ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


def yarn_attention_factor(factor: float) -> float:
    """YaRN's default cos/sin multiplier (its paper's mscale): 0.1 ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _llama3(inv: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by the factor, short ones kept, a smooth ramp between."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    orig = cfg.rope_original_max_len
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < orig / high) * ~(wavelen > orig / low)
    return torch.where(medium, smoothed, out)


def _yarn(cfg: ModelConfig, dim: int) -> torch.Tensor:
    """YaRN: dims rotating fewer than beta_slow times over the original context are interpolated
    (divided by the factor), those rotating more than beta_fast times kept, a linear ramp
    between."""
    base, factor, orig = cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_len

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    keep = 1 - ramp  # (Dh/2,) share of the extrapolated (unscaled) frequency
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def inv_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(Dh/2,) float32 inverse frequencies and the factor cos/sin are multiplied by (yarn's
    attention factor; 1 otherwise) of a resolved config."""
    dim = cfg.head_dim
    if cfg.rope_scaling == "yarn":
        return _yarn(cfg, dim), cfg.rope_attention_factor
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        inv = _llama3(inv, cfg)
    return inv, 1.0


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, Dh) in the half-split layout of LLaMA checkpoints."""
    inv, scale = inv_frequencies(cfg)
    ang = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv)  # (n, Dh/2)
    ang = torch.cat([ang, ang], dim=-1)  # (n, Dh)
    if scale == 1.0:
        return ang.cos(), ang.sin()
    return ang.cos() * scale, ang.sin() * scale


def check_rope(cfg: ModelConfig) -> list[tuple[bool, str]]:
    """The (ok, message) checks of the rope_* keys of a resolved config."""
    kind = cfg.rope_scaling
    return [
        (kind in ROPE_SCALINGS, f"model.rope_scaling={kind!r}; choose from {ROPE_SCALINGS}"),
        (
            kind == "none" or cfg.position == "rope",
            f"model.rope_scaling={kind!r} needs model.position='rope' (got {cfg.position!r})",
        ),
        (
            kind == "none" or cfg.rope_factor >= 1.0,
            f"model.rope_factor must be >= 1 for rope_scaling={kind!r}, got {cfg.rope_factor}",
        ),
        (
            kind != "none" or cfg.rope_factor == 1.0,
            "model.rope_factor applies only with model.rope_scaling=linear, llama3 or yarn",
        ),
        (
            kind != "llama3" or cfg.rope_high_freq_factor > cfg.rope_low_freq_factor > 0,
            "llama3 rope needs model.rope_high_freq_factor > model.rope_low_freq_factor > 0",
        ),
        (
            kind != "yarn" or cfg.rope_beta_fast > cfg.rope_beta_slow > 0,
            "yarn rope needs model.rope_beta_fast > model.rope_beta_slow > 0",
        ),
        (cfg.rope_original_max_len >= 0, "model.rope_original_max_len must be >= 0"),
    ]
