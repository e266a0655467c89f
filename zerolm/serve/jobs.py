"""What the scheduler (serve/scheduler.py) takes and reports: a Job (one generation: its prompt,
limits, sampling and event callback), the Token events it emits, and the serving Stats."""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from zerolm.infer.decode import Row
from zerolm.infer.sampling import SamplingParams

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503 + Retry-After)."""


@dataclass
class Token:
    id: int
    logprob: float | None = None  # log-probability under the model (before sampling filters)
    top: list[tuple[int, float]] = field(default_factory=list)  # the top_logprobs alternatives


@dataclass(eq=False)
class Job:
    """One generation: a prompt, its limits and sampling, and its state once running."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k alternatives
    emit: Callable[[str, object], None] = lambda kind, value: None
    # state
    slot: int = -1
    cancelled: bool = False
    submitted: float = 0.0
    row: Row | None = None  # its decode state (infer/decode.py), from its admission on

    def cancel(self) -> None:
        """Ask the scheduler to drop this sequence at its next step (thread-safe: one flag)."""
        self.cancelled = True

    def check(self, room: int, vocab: int) -> None:
        """Raise ValueError for a job that could fail once running: bad ids, seed or sampling, or
        no room for its prompt and max_new_tokens in a window of `room` tokens."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.prompt:
            raise ValueError("the prompt is empty: give at least one token id (e.g. the bos token)")
        if len(self.prompt) + self.max_new_tokens > room:
            raise ValueError(
                f"prompt of {len(self.prompt)} tokens + max_new_tokens={self.max_new_tokens} must "
                f"fit in the model's window of {room} tokens: shorten the prompt or lower "
                "max_new_tokens"
            )
        bad = next(
            (j for j, t in enumerate(self.prompt) if not _is_int(t) or not 0 <= t < vocab), None
        )
        if bad is not None:
            raise ValueError(
                f"prompt token {bad} is {self.prompt[bad]!r}: token ids must be integers in "
                f"[0, {vocab}) (the vocabulary)"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        self.sampling.validate()

    @property
    def running_row(self) -> Row:
        """Its decode state, which every job has from its admission on."""
        assert self.row is not None, "the job has not been admitted"
        return self.row

    @property
    def generated(self) -> int:
        """Tokens generated so far."""
        return 0 if self.row is None else self.row.generated


@dataclass
class Stats:
    requests: int = 0
    tokens: int = 0
    steps: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    ttft_buckets: dict[float, int] = field(default_factory=lambda: dict.fromkeys(TTFT_BUCKETS, 0))
    recent: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=4096)
    )  # (time, tokens)
    nonfinite_logits: int = 0  # sequences ended because their logits were NaN or inf
    failed_rows: int = 0  # sequences ended because their own sampling or callback raised
    failed_passes: int = 0  # model passes (prefill or decode) that raised
    last_error: str | None = None

    def record_ttft(self, dt: float) -> None:
        self.ttft_sum += dt
        self.ttft_count += 1
        for b in TTFT_BUCKETS:
            if dt <= b:
                self.ttft_buckets[b] += 1


def _is_int(x) -> bool:
    """An integer (int, numpy or 0-d tensor integer), not a bool or a float."""
    if isinstance(x, bool):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True
