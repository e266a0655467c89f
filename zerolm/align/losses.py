"""The math of learning from preferences, as pure functions of tensors (no models, no state).

Legend: B batch of pairs or sequences, T response tokens, G group size (GRPO).

- pairwise_loss: reward model, Bradley-Terry: -log sigmoid(r_chosen - r_rejected).
- sequence_logprobs: the sums of token_logprobs (zerolm/eval/replies.py) over each sequence's
  response tokens.
- dpo_loss: Rafailov et al. 2023, -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).
- kl_penalty / kl_rewards: per-token KL estimate to the reference, folded into PPO's rewards.
- gae: generalised advantage estimation (Schulman et al. 2016) over response tokens.
- ppo_policy_loss / ppo_value_loss: clipped surrogate and clipped value losses
  (Schulman et al. 2017).
- group_advantages: GRPO's critic-free advantages, reward standardised within each prompt's group.
- masked_mean: the mean over real (mask = 1) tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zerolm.eval.replies import token_logprobs


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is 1 (over all, or over `dim`); 0 where nothing is masked in."""
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def pairwise_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean -log sigmoid(r_c - r_r), accuracy: share of pairs with r_c > r_r); inputs (B,)."""
    margin = r_chosen - r_rejected
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def sequence_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(B,) sum over t of log p(targets[t] | logits[t]) where mask[t] = 1 (the response tokens).
    logits (B, T, V) already aligned with targets (B, T): position t predicts targets[t]."""
    logp = token_logprobs(logits, targets)  # (B, T)
    return (logp * mask.to(logp.dtype)).sum(-1)


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on summed response log-probs, each (B,). Returns (mean loss, stats): the implicit rewards
    beta * (pi - ref) of chosen and rejected, their margin and the accuracy (margin > 0)."""
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0 (typical 0.05-0.5), got {beta}")
    r_c = beta * (pi_chosen - ref_chosen)
    r_r = beta * (pi_rejected - ref_rejected)
    margin = r_c - r_r
    loss = -F.logsigmoid(margin).mean()
    return loss, {
        "reward_chosen": r_c.mean().detach(),
        "reward_rejected": r_r.mean().detach(),
        "margin": margin.mean().detach(),
        "accuracy": (margin > 0).float().mean(),
    }


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs: logp - ref_logp
    (its expectation under pi is the KL; zero when the policy equals the reference)."""
    return logp - ref_logp


def kl_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """(B, T) PPO rewards: -kl_coef * KL at every response token, plus the sequence score (B,)
    at its last real token (as in Ziegler et al. 2019 / InstructGPT)."""
    rewards = -kl_coef * kl_penalty(logp, ref_logp) * mask
    last = mask.long().cumsum(-1).argmax(-1)  # (B,) index of the last real token
    rewards[torch.arange(len(score)), last] += score
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T), over response tokens with mask (B, T) = 1 on real ones
    (a contiguous run from the left). delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the
    last token; A_t = delta_t + gamma lam A_{t+1}; returns = A + V. Zero where mask = 0."""
    mask = mask.to(rewards.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        adv[:, t] = running
        next_value = values[:, t] * m  # past the last token the next value is 0
    return adv, (adv + values) * mask


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over real tokens of max(-A r, -A clip(r, 1-eps, 1+eps)) with
    r = exp(logp - old_logp). Stats: the share of tokens clipped and the approximate KL
    mean((r - 1) - log r) between the old and new policy (for early stopping)."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """0.5 * mean over real tokens of max((V - R)^2, (V_clipped - R)^2), with
    V_clipped = old + clip(V - old, +-eps)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(
        torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask
    )


def group_advantages(scores: torch.Tensor, group: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: scores (B,) of B = n_prompts * group samples, grouped consecutively; each sample's
    advantage is (score - group mean) / (group std + eps), the same for all its tokens."""
    if scores.numel() % group:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group}")
    g = scores.view(-1, group)
    return ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True, unbiased=False) + eps)).view(
        -1
    )
