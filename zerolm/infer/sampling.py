"""Sampling: pure functions from next-token logits (B, V) to token ids (B,).

B = batch rows, V = vocabulary size. Every function returns a new tensor and never mutates
its input; filtered-out entries become -inf. Randomness enters only through an explicit
`torch.Generator`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Slack for boundary comparisons in top-p / min-p: a boundary reached exactly in real numbers
# (e.g. 0.5 + 0.2 >= 0.7) must count as reached after float32 rounding.
_EPS = 1e-6


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, *, repetition: float = 1.0,
                    presence: float = 0.0, frequency: float = 0.0) -> torch.Tensor:
    """Penalise tokens already seen; `counts` (B, V) = occurrences so far (prompt + generated).

    Repetition (HF/CTRL): for seen tokens, positive logits are divided by `repetition`,
    negative ones multiplied by it. Then presence/frequency (OpenAI):
    `logits - presence * (counts > 0) - frequency * counts`.
    """
    if counts.shape != logits.shape:
        raise ValueError(f"counts shape {tuple(counts.shape)} must equal logits shape {tuple(logits.shape)}")
    if repetition == 1.0 and presence == 0.0 and frequency == 0.0:
        return logits.clone()
    seen = counts > 0  # (B, V)
    out = logits
    if repetition != 1.0:
        scaled = torch.where(logits > 0, logits / repetition, logits * repetition)  # (B, V)
        out = torch.where(seen, scaled, logits)  # (B, V)
    if presence != 0.0:
        out = out - presence * seen.to(logits.dtype)  # (B, V)
    if frequency != 0.0:
        out = out - frequency * counts.to(logits.dtype)  # (B, V)
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by `temperature` (> 0): below 1 sharpens, above 1 flattens."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature}")
    return logits / temperature  # (B, V)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (k <= 0 or k >= V: no-op).

    Ties at the k-th value are all kept, so a row may keep more than k tokens; this makes
    the result independent of how the sort orders equal values.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits.clone()
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)  # (B, V)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose cumulative
    probability is >= p (the top token always stays; p >= 1: no-op)."""
    if p >= 1.0:
        return logits.clone()
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)  # (B, V)
    before = torch.cumsum(probs, dim=-1) - probs  # (B, V) mass of strictly more probable tokens
    drop_sorted = before >= p - _EPS  # (B, V) the set is already complete without this token
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V)
    return logits.masked_fill(drop, -math.inf)  # (B, V)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is >= min_p * (the row's max probability); min_p <= 0: no-op."""
    if min_p <= 0.0:
        return logits.clone()
    # p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p); no softmax needed
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p) - _EPS  # (B, 1)
    return logits.masked_fill(logits < threshold, -math.inf)  # (B, V)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick the next token. temperature == 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the bad field and its valid range."""
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = disabled), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = disabled), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = disabled), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (0 = disabled), got {getattr(self, name)}")


def filtered_logits(logits: torch.Tensor, params: SamplingParams,
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits after, in this order: penalties (if `counts` given) -> temperature ->
    top-k -> top-p -> min-p. Penalties act on raw scores (as in HF and vLLM) and the
    filters see the tempered distribution. temperature == 0 skips the scaling."""
    params.validate()
    out = logits.float()  # (B, V)
    if counts is not None:
        out = apply_penalties(out, counts, repetition=params.repetition_penalty,
                              presence=params.presence_penalty, frequency=params.frequency_penalty)
    if params.temperature > 0:
        out = apply_temperature(out, params.temperature)
    out = top_k_filter(out, params.top_k)
    out = top_p_filter(out, params.top_p)
    return min_p_filter(out, params.min_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           counts: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row, (B,) long. Greedy argmax when temperature == 0 (penalties still
    apply, the generator is untouched); otherwise a draw from softmax(filtered_logits)."""
    params.validate()
    if params.temperature == 0:
        out = logits.float()  # (B, V)
        if counts is not None:
            out = apply_penalties(out, counts, repetition=params.repetition_penalty,
                                  presence=params.presence_penalty, frequency=params.frequency_penalty)
        return out.argmax(dim=-1)  # (B,)
    probs = torch.softmax(filtered_logits(logits, params, counts), dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
