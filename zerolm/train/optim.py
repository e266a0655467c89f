"""AdamW with decay / no-decay groups, and learning-rate schedules as pure functions."""

from __future__ import annotations

import math

import torch

from zerolm.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to
    lr·min_lr_ratio, warmup-stable-decay (constant, then linear decay over the last
    decay_fraction of steps), or constant."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.steps * cfg.decay_fraction))
        start = cfg.steps - decay_steps
        if step < start:
            return peak
        return peak + (floor - peak) * min(1.0, (step - start + 1) / decay_steps)
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear weights, embeddings) decay; vectors (biases, norm gains) do not."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over parameter, gradient and both moments): measured
    76 -> 16 ms per step for 20 M parameters on the 2-core CPU, against the multi-tensor version."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        fused=True,
    )
