"""Sampling: pure functions from next-token logits (B, V) to token ids (B,).

B = batch rows, V = vocabulary size. Every function returns a new tensor and never mutates
its input; filtered-out entries become -inf. Randomness enters only through an explicit
`torch.Generator`.

No NaN from finite logits, for any parameters `SamplingParams.validate` accepts: penalties and
temperature are computed in float64 and saturate at the dtype's largest finite value instead
of overflowing (1 / 5e-324 is inf even in float64; inf - inf and 0 * inf are NaN), the
temperature divides logits shifted so that the row's top one is 0, and temperatures below
GREEDY_BELOW are greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Slack for boundary comparisons in top-p / min-p: a boundary reached exactly in real numbers
# (e.g. 0.5 + 0.2 >= 0.7) must count as reached after float32 rounding.
_EPS = 1e-6
# Temperatures below this are greedy (argmax), as in vLLM: at 1e-5 a token 1e-3 below the top
# logit already has probability e^-100 (under float32's smallest normal), so a draw differs from
# argmax only among near-ties that float32 (let alone bf16) logits do not resolve.
GREEDY_BELOW = 1e-5


def _saturate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x clamped to dtype's finite range: an overflow (+-inf) becomes the largest finite value."""
    big = torch.finfo(dtype).max
    return x.clamp(-big, big)


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    *,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> torch.Tensor:
    """Penalise tokens already seen; `counts` (B, V) = occurrences so far (prompt + generated).

    Repetition (HF/CTRL): for seen tokens, positive logits are divided by `repetition`,
    negative ones multiplied by it. Then presence/frequency (OpenAI):
    `logits - presence * (counts > 0) - frequency * counts`. Finite logits stay finite: a result
    beyond the dtype's range saturates at its largest finite value.
    """
    if counts.shape != logits.shape:
        raise ValueError(
            f"counts shape {tuple(counts.shape)} must equal logits shape {tuple(logits.shape)}"
        )
    if repetition == 1.0 and presence == 0.0 and frequency == 0.0:
        return logits.clone()
    seen = counts > 0  # (B, V)
    dt = logits.dtype
    out = logits.double()  # (B, V); each step saturates, so no later step meets an inf
    if repetition != 1.0:
        scaled = torch.where(out > 0, out / repetition, out * repetition)  # (B, V)
        out = _saturate(torch.where(seen, scaled, out), dt)
    if presence != 0.0:
        out = _saturate(torch.where(seen, out - presence, out), dt)  # (B, V)
    if frequency != 0.0:
        out = _saturate(out - frequency * counts.double(), dt)  # (B, V)
    return out.to(dt)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by `temperature` (> 0): below 1 sharpens, above 1 flattens. Each row is first
    shifted so that its largest logit is 0 (softmax does not change), so nothing overflows to +inf
    and the top token always keeps a finite score."""
    if not 0 < temperature < math.inf:
        raise ValueError(
            f"temperature must be a finite number > 0 to scale logits, got {temperature}"
        )
    shifted = logits.double() - logits.double().amax(dim=-1, keepdim=True)  # (B, V), <= 0
    return (shifted / temperature).to(logits.dtype)  # (B, V)


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
    """Keep tokens whose probability is >= min_p * (the row's max probability); min_p <= 0:
    no-op."""
    if min_p <= 0.0:
        return logits.clone()
    # p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p); no softmax needed
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p) - _EPS  # (B, 1)
    return logits.masked_fill(logits < threshold, -math.inf)  # (B, V)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick the next token. temperature == 0 (or below GREEDY_BELOW) means greedy
    (argmax)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        """Raise ValueError naming the bad field and its valid range; every value accepted here
        samples a valid id without NaN from finite logits."""
        if not 0 <= self.temperature < math.inf:
            raise ValueError(
                f"temperature must be a finite number >= 0 (below {GREEDY_BELOW} = greedy), "
                f"got {self.temperature}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = disabled), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = disabled), got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(
                f"repetition_penalty must be a finite number > 0 (1 = disabled), "
                f"got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(
                    f"{name} must be a finite number (0 = disabled), got {getattr(self, name)}"
                )


def _penalised(
    logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None
) -> torch.Tensor:
    out = logits.float()  # (B, V)
    if counts is None:
        return out
    return apply_penalties(
        out,
        counts,
        repetition=params.repetition_penalty,
        presence=params.presence_penalty,
        frequency=params.frequency_penalty,
    )


def filtered_logits(
    logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits after, in this order: penalties (if `counts` given) -> temperature ->
    top-k -> top-p -> min-p. Penalties act on raw scores (as in HF and vLLM) and the
    filters see the tempered distribution. A greedy temperature skips the scaling."""
    params.validate()
    out = _penalised(logits, params, counts)  # (B, V)
    if not params.greedy:
        out = apply_temperature(out, params.temperature)
    out = top_k_filter(out, params.top_k)
    out = top_p_filter(out, params.top_p)
    return min_p_filter(out, params.min_p)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row, (B,) long. Greedy argmax when params.greedy (penalties still apply,
    the generator is untouched); otherwise a draw from softmax(filtered_logits)."""
    params.validate()
    if params.greedy:
        return _penalised(logits, params, counts).argmax(dim=-1)  # (B,)
    probs = torch.softmax(filtered_logits(logits, params, counts), dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
