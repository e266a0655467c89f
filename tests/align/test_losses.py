"""Alignment math against values computed by hand."""

import math

import pytest
import torch

from zerolm.align.losses import (
    dpo_loss,
    gae,
    group_advantages,
    kl_penalty,
    kl_rewards,
    masked_mean,
    pairwise_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_pairwise_loss_closed_form():
    loss, acc = pairwise_loss(t(2.0, 0.0, -1.0), t(0.0, 0.0, 1.0))
    want = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert acc.item() == pytest.approx(1 / 3)  # a tie is not a win


def test_dpo_with_policy_equal_to_reference_is_log2_with_zero_margins():
    lp = t(-10.0, -3.5, -7.25)
    loss, stats = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert (
        stats["margin"].item() == 0
        and stats["reward_chosen"].item() == 0
        and stats["accuracy"].item() == 0
    )


def test_dpo_closed_form_and_gradient_direction():
    pi_c, pi_r = t(-10.0).requires_grad_(), t(-15.0).requires_grad_()
    loss, stats = dpo_loss(pi_c, pi_r, t(-12.0), t(-14.0), beta=0.1)
    # r_c = 0.1 * 2 = 0.2, r_r = 0.1 * -1 = -0.1, margin 0.3
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.3)), abs=1e-12)
    assert stats["margin"].item() == pytest.approx(0.3) and stats["accuracy"].item() == 1.0
    loss.backward()
    s = 1 / (1 + math.exp(0.3))  # sigmoid(-margin)
    assert pi_c.grad.item() == pytest.approx(-0.1 * s) and pi_r.grad.item() == pytest.approx(
        0.1 * s
    )
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pi_c, pi_r, t(0.0), t(0.0), beta=0)


def test_sequence_logprobs_sums_response_tokens_only():
    logits = torch.log(t([0.25, 0.75], [0.5, 0.5], [0.9, 0.1]))[
        None
    ]  # (1, 3, 2): probabilities given
    targets = torch.tensor([[1, 0, 0]])
    got = sequence_logprobs(logits, targets, torch.tensor([[0, 1, 1]]))
    assert got.item() == pytest.approx(math.log(0.5) + math.log(0.9), abs=1e-6)


def test_gae_by_hand():
    adv, ret = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.95)
    # deltas: 0.1, 0.1, 0.3; A2 = 0.3, A1 = 0.1 + .95 * .3, A0 = 0.1 + .95 * A1
    assert adv[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert ret[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])
    adv, ret = gae(t([0.0, 1.0, 5.0]), t([0.5, 0.6, 9.0]), t([1, 1, 0]), gamma=0.9, lam=1.0)
    # the padded third token counts for nothing: A1 = 1 - 0.6, A0 = 0 + .9 * .6 - .5 + .9 * A1
    assert adv[0].tolist() == pytest.approx([0.4, 0.4, 0.0])
    assert ret[0].tolist() == pytest.approx([0.9, 1.0, 0.0])


@pytest.mark.parametrize(
    "ratio, adv, clipped, want",
    [
        (1.5, 1.0, True, -1.2),  # A > 0: gains capped at 1 + eps
        (0.5, -1.0, True, 0.8),  # A < 0: cannot push the ratio below 1 - eps for more gain
        (0.5, 1.0, False, -0.5),  # pessimistic side: unclipped
        (1.5, -1.0, False, 1.5),
        (1.2, 1.0, False, -1.2),  # exactly at the boundary: not counted as clipped
        (1.0, 2.0, False, -2.0),
    ],
)
def test_ppo_clipping_at_the_boundaries(ratio, adv, clipped, want):
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss, stats = ppo_policy_loss(logp, t([0.0]), t([adv]), t([1]), clip=0.2)
    assert loss.item() == pytest.approx(want, abs=1e-9)
    assert stats["clip_fraction"].item() == (1.0 if clipped else 0.0)
    loss.backward()
    assert (logp.grad.abs().item() == 0) == clipped  # no gradient through a clipped token
    assert stats["approx_kl"].item() == pytest.approx((ratio - 1) - math.log(ratio), abs=1e-9)


def test_ppo_value_loss_clips_around_the_old_value():
    # V moved from 0 to 1 with clip 0.2: clipped value 0.2; return 2
    # -> max((1-2)^2, (0.2-2)^2) = 3.24
    assert ppo_value_loss(t([1.0]), t([0.0]), t([2.0]), t([1])).item() == pytest.approx(0.5 * 3.24)
    # return 0.5: max(0.25, 0.09) = 0.25
    assert ppo_value_loss(t([1.0]), t([0.0]), t([0.5]), t([1])).item() == pytest.approx(0.125)


def test_kl_is_zero_when_policy_equals_reference_and_the_score_lands_on_the_last_token():
    lp = t([-1.0, -2.0, -0.5, -9.0])
    assert torch.all(kl_penalty(lp, lp) == 0)
    r = kl_rewards(t(3.0), lp, lp, t([1, 1, 1, 0]), kl_coef=0.1)
    assert r[0].tolist() == [0.0, 0.0, 3.0, 0.0]
    r = kl_rewards(t(3.0), lp, lp - 0.5, t([1, 1, 1, 0]), kl_coef=0.1)
    assert r[0].tolist() == pytest.approx([-0.05, -0.05, 2.95, 0.0])


def test_group_advantages_and_masked_mean():
    adv = group_advantages(t(1.0, 2.0, 3.0, 5.0, 5.0, 5.0), group=3)
    s = math.sqrt(2 / 3)
    assert adv.tolist() == pytest.approx([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0], abs=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(t(1.0, 2.0, 3.0), group=4)
    assert masked_mean(t([1.0, 2.0, 100.0]), t([1, 1, 0])).item() == 1.5
