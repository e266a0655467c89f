"""The one decode step: a per-row state and a step that samples and records every row's next token.

Engine.stream (infer/engine.py), the server's continuous batching (serve/scheduler.py) and the
encoder-decoder (infer/seq2seq.py) each run their model passes (prefill, cached or compiled decode
steps, cross-attention) and hand the (B, V) next-token logits of their rows to `advance`. A `Row`
holds what sampling a sequence needs between steps: its parameters, its random generator, its
token counts (kept only when a penalty reads them), its stop ids and its budget of new tokens.

Rows that share a generator and their parameters are drawn in one call over the batch, as one
request's rows always were (`Engine.stream`, seq2seq): the draw of a row then depends on its place
in that batch, so such rows stay in it until the request ends (finished ones are drawn and not
recorded). A row with a generator of its own (a server request) draws the same tokens alone or in
a crowd.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

import torch

from zerolm.infer.sampling import SamplingParams, sample


def penalised(sampling: SamplingParams) -> bool:
    """Whether a penalty reads the token counts."""
    off = (1.0, 0.0, 0.0)
    return (
        sampling.repetition_penalty,
        sampling.presence_penalty,
        sampling.frequency_penalty,
    ) != off


def seeded_generator(seed: int | None, device: torch.device | str | None = None) -> torch.Generator:
    """A generator seeded with `seed`, or from fresh entropy when it is None."""
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    return gen


@dataclass(eq=False)
class Row:
    """One sequence's decode state. `finish` becomes "stop" (a stop id was drawn) or "length"
    (`budget` tokens were drawn); `last` is the latest token, the input of the next step."""

    sampling: SamplingParams
    generator: torch.Generator | None
    budget: int
    stop_ids: frozenset[int] = frozenset()
    counts: torch.Tensor | None = None  # (V,) occurrences so far, only when a penalty reads them
    generated: int = 0
    last: int = -1
    finish: Literal["stop", "length"] | None = None

    @classmethod
    def start(
        cls,
        sampling: SamplingParams,
        budget: int,
        vocab: int,
        *,
        generator: torch.Generator | None,
        prompt: Sequence[int] = (),
        stop_ids: Sequence[int] = (),
        device: torch.device | str | None = None,
    ) -> Row:
        """A row about to draw its first token; `prompt` is what the penalties count as seen."""
        counts = None
        if penalised(sampling):
            ids = torch.tensor(list(prompt), dtype=torch.long, device=device)
            counts = torch.bincount(ids, minlength=vocab)  # (V,)
        return cls(sampling, generator, budget, frozenset(stop_ids), counts)

    def record(self, token: int) -> None:
        """Take `token` as this row's next one."""
        if self.counts is not None:
            self.counts[token] += 1
        self.generated += 1
        self.last = token
        if token in self.stop_ids:
            self.finish = "stop"
        elif self.generated >= self.budget:
            self.finish = "length"


def _draw(rows: Sequence[Row], logits: torch.Tensor, js: list[int]) -> list[int]:
    """Tokens of rows `js` (which share parameters, and a generator unless greedy) in one call."""
    row = rows[js[0]]
    sub = logits if len(js) == logits.shape[0] else logits[js]  # (G, V)
    counts = None
    if row.counts is not None:  # then every row of the group keeps counts (choose groups by it)
        counts = torch.stack([c for j in js if (c := rows[j].counts) is not None])
    gen = None if row.sampling.greedy else row.generator
    return sample(sub, row.sampling, gen, counts).tolist()


def choose(rows: Sequence[Row], logits: torch.Tensor) -> list[int | Exception]:
    """Next token of each row (row j's logits are logits[j], (B, V)), or the exception its sampling
    raised: greedy rows with equal parameters in one call (argmax needs no generator; one by one if
    that call raises), sampled rows with equal parameters and one generator in one draw."""
    groups: dict[tuple, list[int]] = {}
    for j, r in enumerate(rows):
        key = (r.sampling, r.counts is not None, r.sampling.greedy or id(r.generator))
        groups.setdefault(key, []).append(j)
    out: list[int | Exception] = [0] * len(rows)
    for js in groups.values():
        try:
            for j, tok in zip(js, _draw(rows, logits, js)):
                out[j] = tok
        except Exception as e:
            retry = len(js) > 1 and rows[js[0]].sampling.greedy  # the fault may be one row's
            for j in js:
                out[j] = _alone(rows, logits, j) if retry else e
    return out


def _alone(rows: Sequence[Row], logits: torch.Tensor, j: int) -> int | Exception:
    try:
        return _draw(rows, logits, [j])[0]
    except Exception as e:
        return e


@overload
def advance(
    rows: Sequence[Row], logits: torch.Tensor, errors: Literal["raise"] = "raise"
) -> list[int]: ...
@overload
def advance(
    rows: Sequence[Row], logits: torch.Tensor, errors: Literal["return"]
) -> list[int | Exception]: ...
def advance(
    rows: Sequence[Row], logits: torch.Tensor, errors: Literal["raise", "return"] = "raise"
) -> list[int] | list[int | Exception]:
    """Choose every row's next token from its (B, V) logits and record it on the rows not yet
    finished. A row whose sampling raised records nothing: errors="raise" raises the first such
    exception (one request's rows), "return" puts it in that row's place (the server's rows)."""
    chosen = choose(rows, logits)
    failed = [t for t in chosen if isinstance(t, Exception)]
    if failed and errors == "raise":
        raise failed[0]
    for row, tok in zip(rows, chosen):
        if row.finish is None and not isinstance(tok, Exception):
            row.record(tok)
    return chosen
