"""The one decode step (infer/decode.py) against infer/sampling.py itself: rows sharing a generator
draw as one batch, rows with their own draw the same alone or together, greedy rows need no
generator, a row's sampling fault stays its own, and a row records tokens until a stop id or its
budget ends it."""

import math

import pytest
import torch

from zerolm.infer.decode import Row, advance, choose, seeded_generator
from zerolm.infer.sampling import SamplingParams, sample

V = 50
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9)
GREEDY = SamplingParams(temperature=0)
PENALISED = SamplingParams(temperature=0.7, repetition_penalty=1.5, frequency_penalty=0.3)


def logits(B=4, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3  # (B, V)


def row(sampling=SAMPLED, seed=1, budget=10, **kw):
    return Row.start(sampling, budget, V, generator=seeded_generator(seed), **kw)


def test_rows_sharing_a_generator_draw_as_one_batch():
    gen = seeded_generator(7)
    rows = [Row.start(PENALISED, 10, V, generator=gen, prompt=[i, i, 3]) for i in range(4)]
    counts = torch.stack([torch.bincount(torch.tensor([i, i, 3]), minlength=V) for i in range(4)])
    want = sample(logits(), PENALISED, seeded_generator(7), counts).tolist()
    assert advance(rows, logits()) == want
    assert [r.last for r in rows] == want and all(r.generated == 1 for r in rows)
    assert all(
        int(r.counts[t]) == int(counts[i, t]) + 1 for i, (r, t) in enumerate(zip(rows, want))
    )


def test_rows_with_their_own_generators_draw_the_same_alone_or_together():
    x = logits(6)
    params = [SAMPLED, GREEDY, PENALISED, SAMPLED, GREEDY, SamplingParams(temperature=2.0)]
    together = choose([row(p, seed=i) for i, p in enumerate(params)], x)
    alone = [choose([row(p, seed=i)], x[i : i + 1])[0] for i, p in enumerate(params)]
    assert together == alone
    assert together[1] == int(x[1].argmax()) and together[4] == int(x[4].argmax())


def test_a_rows_sampling_fault_stays_its_own():
    bad = SamplingParams(temperature=math.nan)
    rows = [row(GREEDY), row(bad), row(SAMPLED, seed=3), row(GREEDY)]
    got = advance(rows, logits(), errors="return")
    assert isinstance(got[1], ValueError) and "temperature" in str(got[1])
    x = logits()
    assert got[0] == int(x[0].argmax()) and got[3] == int(x[3].argmax())
    assert got[2] == choose([row(SAMPLED, seed=3)], x[2:3])[0]
    assert [r.generated for r in rows] == [1, 0, 1, 1]
    # greedy rows of one call: when it raises they are retried alone, so only the faulty one fails
    pen = SamplingParams(temperature=0, presence_penalty=1.0)
    greedy = [row(pen, prompt=[1]) for _ in range(3)]
    greedy[1].counts = torch.zeros(V + 1, dtype=torch.long)  # a broken row
    got = choose(greedy, x[:3])
    assert isinstance(got[1], ValueError) and got[0] == choose(greedy[:1], x[:1])[0]
    assert got[2] == choose(greedy[2:], x[2:3])[0]
    with pytest.raises(ValueError, match="temperature"):
        advance([row(GREEDY), row(bad)], logits(2))


def test_a_row_ends_at_a_stop_id_or_its_budget_and_then_records_nothing():
    r = row(GREEDY, budget=3, stop_ids=(9,))
    for tok, finish in ((4, None), (9, "stop")):
        r.record(tok)
        assert r.finish == finish
    budgeted = row(GREEDY, budget=2)
    x = logits(1)
    for _ in range(4):  # a finished row is still drawn (its place in the batch) but not recorded
        advance([budgeted], x)
    assert budgeted.generated == 2 and budgeted.finish == "length"
    assert row(GREEDY).counts is None and row(PENALISED, prompt=[2, 2]).counts[2] == 2
