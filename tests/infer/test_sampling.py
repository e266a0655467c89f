import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zerolm.infer.sampling import (
    SamplingParams,
    apply_penalties,
    apply_temperature,
    filtered_logits,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)

P = [0.5, 0.2, 0.15, 0.1, 0.05]
LOGITS = torch.log(torch.tensor([P]))  # (1, 5)


def support(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def renormalised(keep: set[int]) -> torch.Tensor:
    total = sum(P[i] for i in keep)
    return torch.tensor([[P[i] / total if i in keep else 0.0 for i in range(len(P))]])


@pytest.mark.parametrize(
    ("p", "keep"), [(0.7, {0, 1}), (0.71, {0, 1, 2}), (0.4, {0}), (0.999, {0, 1, 2, 3, 4})]
)
def test_top_p_keeps_smallest_nucleus(p, keep):
    out = top_p_filter(LOGITS, p)
    assert support(out) == keep
    torch.testing.assert_close(torch.softmax(out, -1), renormalised(keep), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("probs", "p", "keep"),
    [
        ([0.5, 0.25, 0.125, 0.125], 0.75, {0, 1}),  # exact in binary: the boundary is ">=", not ">"
        ([0.45, 0.35, 0.15, 0.05], 0.45, {0}),  # float32 softmax gives 0.44999996: still reached
        ([0.4, 0.3, 0.2, 0.1], 1e-9, {0}),  # the top token survives any p
    ],
)
def test_top_p_boundaries(probs, p, keep):
    assert support(top_p_filter(torch.log(torch.tensor([probs])), p)) == keep


def test_top_p_unsorted_input_and_noop():
    perm = torch.tensor([3, 0, 4, 2, 1])
    out = top_p_filter(LOGITS[:, perm], 0.7)  # token 0 is at column 1, token 1 at column 4
    assert support(out) == {1, 4}
    torch.testing.assert_close(top_p_filter(LOGITS, 1.0), LOGITS)


def test_top_k():
    out = top_k_filter(LOGITS, 2)
    assert support(out) == {0, 1}
    torch.testing.assert_close(torch.softmax(out, -1), renormalised({0, 1}), atol=1e-6, rtol=0)
    assert support(top_k_filter(LOGITS, 0)) == set(range(5))
    assert support(top_k_filter(LOGITS, 5)) == set(range(5))


def test_top_k_keeps_ties():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert support(top_k_filter(logits, 2)) == {0, 2, 3}


def test_min_p():
    out = min_p_filter(LOGITS, 0.3)  # threshold 0.3 * 0.5 = 0.15
    assert support(out) == {0, 1, 2}
    torch.testing.assert_close(torch.softmax(out, -1), renormalised({0, 1, 2}), atol=1e-6, rtol=0)
    assert support(min_p_filter(LOGITS, 0.31)) == {0, 1}
    assert support(min_p_filter(LOGITS, 0.0)) == set(range(5))
    # threshold 0.65 * 0.2 = 0.13 exactly; float32 rounding must not drop token 1
    assert support(min_p_filter(torch.log(torch.tensor([[0.2, 0.13, 0.05]])), 0.65)) == {0, 1}


def test_temperature_hand_softmax():
    out = apply_temperature(torch.tensor([[1.0, 2.0, 3.0]]), 2.0)
    e = [math.exp(0.5), math.exp(1.0), math.exp(1.5)]
    expected = torch.tensor([[x / sum(e) for x in e]])  # 0.186323, 0.307196, 0.506481
    torch.testing.assert_close(torch.softmax(out, -1), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(out, 0.0)


def test_penalties_hand_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    counts = torch.tensor([[1, 2, 0, 1, 0]])
    rep = apply_penalties(logits, counts, repetition=2.0)
    torch.testing.assert_close(rep, torch.tensor([[1.0, -2.0, 0.5, -6.0, 1.0]]))
    pf = apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    torch.testing.assert_close(pf, torch.tensor([[1.25, -2.0, 0.5, -3.75, 1.0]]))
    both = apply_penalties(logits, counts, repetition=2.0, presence=0.5, frequency=0.25)
    torch.testing.assert_close(both, torch.tensor([[0.25, -3.0, 0.5, -6.75, 1.0]]))
    neutral = apply_penalties(logits, counts)
    torch.testing.assert_close(neutral, logits)
    assert neutral.data_ptr() != logits.data_ptr()
    with pytest.raises(ValueError, match="shape"):
        apply_penalties(logits, counts[:, :3], repetition=2.0)


def test_functions_do_not_mutate_input():
    logits = torch.randn(3, 7)
    before = logits.clone()
    counts = torch.randint(0, 3, (3, 7))
    for out in (
        apply_penalties(logits, counts, repetition=1.3, presence=0.2, frequency=0.1),
        apply_temperature(logits, 0.5),
        top_k_filter(logits, 2),
        top_p_filter(logits, 0.5),
        min_p_filter(logits, 0.2),
        top_k_filter(logits, 0),
        top_p_filter(logits, 1.0),
        filtered_logits(logits, SamplingParams(top_k=3, top_p=0.8, min_p=0.1), counts),
    ):
        assert out.data_ptr() != logits.data_ptr()
    torch.testing.assert_close(logits, before, rtol=0, atol=0)


def test_filtered_logits_order():
    # temperature before top-p: at T=2 the distribution flattens, so 0.7 needs more tokens
    params = SamplingParams(temperature=2.0, top_p=0.7)
    flat = torch.softmax(LOGITS / 2, -1)[0]  # 0.328, 0.207, 0.180, 0.147, 0.104
    assert flat[:2].sum() < 0.7 <= flat[:3].sum()
    assert support(filtered_logits(LOGITS, params)) == {0, 1, 2}
    # penalties before filters: token 0 penalised below token 1, so top_k=1 keeps token 1
    counts = torch.tensor([[1, 0, 0, 0, 0]])
    out = filtered_logits(LOGITS, SamplingParams(top_k=1, presence_penalty=1.0), counts)
    assert support(out) == {1}


def empirical(samples: torch.Tensor, v: int) -> torch.Tensor:
    return torch.bincount(samples, minlength=v).float() / samples.numel()


def test_empirical_frequencies_match():
    n = 20_000
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(top_p=0.71)
    s = sample(LOGITS.expand(n, -1), params, generator=g)
    assert s.shape == (n,) and s.dtype == torch.long
    freq = empirical(s, 5)
    assert (freq - renormalised({0, 1, 2})[0]).abs().max() < 0.02
    assert freq[3] == 0 and freq[4] == 0


def test_batch_rows_independent():
    n = 10_000
    rows = torch.log(torch.tensor([[0.6, 0.4, 1e-9, 1e-9], [1e-9, 1e-9, 0.25, 0.75]]))  # (2, 4)
    logits = rows.repeat(n, 1)  # rows alternate
    s = sample(logits, SamplingParams(min_p=0.01), generator=torch.Generator().manual_seed(1))
    f0, f1 = empirical(s[0::2], 4), empirical(s[1::2], 4)
    assert (f0 - torch.tensor([0.6, 0.4, 0, 0])).abs().max() < 0.02
    assert (f1 - torch.tensor([0, 0, 0.25, 0.75])).abs().max() < 0.02


def test_same_seed_same_sequence():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample(logits, params, generator=g) for _ in range(30)])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_greedy_ignores_generator_and_applies_penalties():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, greedy, generator=g).tolist() == [1, 0]
    assert torch.equal(g.get_state(), state)
    assert sample(logits, greedy).tolist() == [1, 0]
    counts = torch.tensor([[0, 1, 0], [1, 0, 0]])
    assert sample(
        logits, SamplingParams(temperature=0.0, presence_penalty=1.5), counts=counts
    ).tolist() == [2, 2]


def test_bfloat16_logits():
    logits = LOGITS.to(torch.bfloat16).expand(8, -1)
    s = sample(logits, SamplingParams(top_k=2), generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.long and set(s.tolist()) <= {0, 1}
    assert filtered_logits(logits, SamplingParams()).dtype == torch.float32


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.0),
        ("repetition_penalty", 0.0),
        ("frequency_penalty", math.inf),
    ],
)
def test_validate_rejects(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate()
    with pytest.raises(ValueError, match=field):
        sample(LOGITS, params)


def test_validate_accepts_defaults_and_edges():
    SamplingParams().validate()
    SamplingParams(
        temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0
    ).validate()


# -- extreme but valid parameters (issue 18): a well-defined id, never NaN or an exception ---------
F32_MAX = torch.finfo(torch.float32).max
HUGE = torch.tensor([[3e38, -3e38, 1e38, 0.0, -1e-45]])  # (1, 5) finite, near the float32 limits


@pytest.mark.parametrize("t", [1e-40, 1e-300, 5e-324, 9.9e-6])
def test_temperature_below_the_floor_is_greedy(t):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    params = SamplingParams(temperature=t)
    assert params.greedy
    assert torch.equal(sample(logits, params, g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)  # greedy: the generator is untouched
    assert not SamplingParams(temperature=1e-5).greedy


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(repetition_penalty=1e-300),
        SamplingParams(repetition_penalty=5e-324),
        SamplingParams(repetition_penalty=1e300),
        SamplingParams(temperature=0, repetition_penalty=5e-324),
        SamplingParams(presence_penalty=-1e308, frequency_penalty=1e308),
        SamplingParams(frequency_penalty=-1e308),
        SamplingParams(temperature=1e-5),
        SamplingParams(temperature=1e300),
        SamplingParams(top_p=1e-30),
        SamplingParams(min_p=5e-324),
        SamplingParams(top_k=10**9),
    ],
)
@pytest.mark.parametrize("logits", [LOGITS, HUGE, torch.tensor([[F32_MAX, -F32_MAX, F32_MAX]])])
def test_extreme_params_give_a_valid_id(params, logits):
    counts = torch.tensor([[1] * (logits.shape[1] - 1) + [0]])
    out = filtered_logits(logits, params, counts)
    assert not out.isnan().any() and torch.isfinite(out).any()
    for _ in range(3):
        i = int(sample(logits, params, torch.Generator().manual_seed(1), counts)[0])
        assert 0 <= i < logits.shape[1] and torch.isfinite(out[0, i])


def test_tiny_top_p_keeps_the_top_token():
    assert support(top_p_filter(LOGITS, 1e-30)) == {0}
    assert support(filtered_logits(HUGE, SamplingParams(top_p=1e-30))) == {0}


def test_huge_penalties_saturate_instead_of_overflowing():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    counts = torch.tensor([[1, 1, 0]])
    # 1/5e-324 overflows every float: the seen positive logit saturates at the float32 maximum
    out = apply_penalties(logits, counts, repetition=5e-324)
    assert (
        out.dtype == torch.float32 and out[0, 0] == F32_MAX and out[0, 1] == 0 and out[0, 2] == 0.5
    )
    out = apply_penalties(
        logits, counts, presence=1e300, frequency=-1e300
    )  # inf - inf without the clamp
    assert torch.isfinite(out).all()


def test_validate_rejects_non_finite():
    for field, value in [
        ("temperature", math.inf),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", math.nan),
        ("top_p", math.nan),
        ("min_p", math.nan),
        ("presence_penalty", math.nan),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value}).validate()


finite32 = st.floats(-F32_MAX, F32_MAX, width=32, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False)


@st.composite
def cases(draw):
    v = draw(st.integers(1, 12))
    rows = draw(st.integers(1, 3))
    logits = torch.tensor(
        draw(st.lists(st.lists(finite32, min_size=v, max_size=v), min_size=rows, max_size=rows))
    )
    counts = torch.tensor(
        draw(
            st.lists(
                st.lists(st.integers(0, 3), min_size=v, max_size=v), min_size=rows, max_size=rows
            )
        )
    )
    params = SamplingParams(
        temperature=draw(st.one_of(st.just(0.0), positive)),
        top_k=draw(st.integers(0, 20)),
        top_p=draw(st.floats(5e-324, 1.0)),
        min_p=draw(st.floats(0.0, 1.0, exclude_max=True)),
        repetition_penalty=draw(positive),
        presence_penalty=draw(st.floats(allow_nan=False, allow_infinity=False)),
        frequency_penalty=draw(st.floats(allow_nan=False, allow_infinity=False)),
    )
    return logits, counts, params, draw(st.integers(0, 2**64 - 1))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(cases())
def test_any_valid_params_on_finite_logits_give_no_nan_and_a_valid_id(case):
    logits, counts, params, seed = case
    params.validate()  # every drawn value is in the documented ranges
    for c in (None, counts):
        out = filtered_logits(logits, params, c)
        assert not out.isnan().any() and torch.isfinite(out).any(-1).all()
        ids = sample(logits, params, torch.Generator().manual_seed(seed), c)
        assert ids.shape == (logits.shape[0],) and ((ids >= 0) & (ids < logits.shape[1])).all()
        if not params.greedy:  # a sampled id is one the filters kept
            assert torch.isfinite(out.gather(1, ids[:, None])).all()
