"""PPO / GRPO rollouts: sampled replies, scored, with their advantages, cut into minibatches;
the stage's batch iterator and loss."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from zerolm.align import losses as L
from zerolm.eval.mode import eval_mode
from zerolm.eval.replies import response_batch, sample_replies, token_logprobs
from zerolm.tokenizer import Tokenizer
from zerolm.train.losses import LossResult
from zerolm.train.precision import autocast

if TYPE_CHECKING:  # ppo.py imports this module
    from zerolm.align.ppo import PolicyValue


log = logging.getLogger(__name__)
MAX_FAILED_ROLLOUTS = 10


class Rollouts:
    """The PPO stage's batch iterator and loss: generates a rollout when the previous one's
    minibatches are used up (or dropped by the KL early stop) and yields its minibatches."""

    def __init__(
        self,
        policy: PolicyValue,
        ref: Callable,
        tok: Tokenizer,
        prompts: list[dict],
        reward: Callable,
        cfg,
        precision: str = "fp32",
    ):
        self.policy, self.ref, self.tok, self.prompts, self.reward = (
            policy,
            ref,
            tok,
            prompts,
            reward,
        )
        self.a, self.batch_size, self.seed, self.precision = (
            cfg.align,
            cfg.train.batch_size,
            cfg.seed,
            precision,
        )
        self.k = 0  # index of the next rollout to generate
        self.buffer: list[tuple] = []
        self.skipped, self.failed_in_row = 0, 0
        self.last_approx_kl: torch.Tensor | None = None
        self.history: list[dict] = []  # one row per rollout: reward, kl, length, seconds

    def __iter__(self):
        return self

    def __next__(self):
        if (
            self.buffer
            and self.a.target_kl
            and self.last_approx_kl is not None
            and float(self.last_approx_kl) > self.a.target_kl
        ):
            log.info(
                "rollout %d: approximate KL %.4f > target_kl %.4f: %d minibatch(es) dropped",
                self.k - 1,
                float(self.last_approx_kl),
                self.a.target_kl,
                len(self.buffer),
            )
            self.buffer = []
        while not self.buffer:
            self.buffer = self.rollout(self.k)
            self.k += 1
        self.last_approx_kl = None
        return self.buffer.pop(0)

    def state_dict(self):  # a rollout in progress is generated again on resume
        return {"next": self.k - 1 if self.buffer else self.k, "skipped": self.skipped}

    def load_state_dict(self, state):
        self.k, self.skipped, self.buffer = state["next"], state["skipped"], []

    def _scores(self, k: int, prompts: list[dict], replies: list[str]) -> torch.Tensor | None:
        try:
            scores = torch.tensor([float(s) for s in self.reward(prompts, replies)])
            if len(scores) != len(replies) or not torch.isfinite(scores).all():
                raise ValueError(
                    f"expected {len(replies)} finite scores, got {scores.tolist()[:8]}"
                )
        except Exception as e:  # any error of user code: reported, the rollout skipped
            self.skipped += 1
            self.failed_in_row += 1
            log.warning(
                "rollout %d skipped: the reward function failed (%s: %s); %d rollout(s) skipped "
                "so far",
                k,
                type(e).__name__,
                e,
                self.skipped,
            )
            if self.failed_in_row >= MAX_FAILED_ROLLOUTS:
                raise ValueError(
                    f"the reward function failed on {MAX_FAILED_ROLLOUTS} rollouts in a row; the "
                    f"last error: {type(e).__name__}: {e}"
                ) from e
            return None
        self.failed_in_row = 0
        return scores

    @torch.no_grad()
    def rollout(self, k: int) -> list[tuple]:
        """Rollout k (its prompts and samples depend only on the seed and k): its minibatches,
        `ppo_epochs` shuffled passes; [] when the reward failed."""
        rng = np.random.default_rng([self.seed, k])
        with eval_mode(self.policy):  # the engine and the scoring pass run in eval mode
            tensors = self._scored(k, rng)
        if tensors is None:
            return []
        out, device = [], tensors[0].device
        for _ in range(self.a.ppo_epochs):
            order = torch.from_numpy(rng.permutation(len(tensors[0]))).to(device)
            for i in range(0, len(order), self.batch_size):
                idx = order[i : i + self.batch_size]
                out.append(tuple(t[idx] for t in tensors))
        return out

    def _scored(self, k: int, rng: np.random.Generator) -> tuple | None:
        """Rollout k's replies, scored, with the policy's log-probs and values, the reference's
        log-probs and the advantages; None when the reward failed."""
        a, t0 = self.a, time.perf_counter()
        pick = rng.choice(
            len(self.prompts), size=min(a.rollout_prompts, len(self.prompts)), replace=False
        )
        prompts = [self.prompts[i] for i in pick for _ in range(a.group)]
        seqs, lens, replies = sample_replies(
            self.policy.body,
            self.tok,
            [p["messages"] for p in prompts],
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            seed=self.seed * 100_003 + k,
            batch_size=len(prompts),
        )
        scores = self._scores(k, prompts, replies)
        if scores is None:
            return None
        device = next(self.policy.parameters()).device
        x, y, mask = (t.to(device) for t in response_batch(seqs, lens))
        scores = scores.to(device)
        with autocast(self.precision, device):
            logits, values = self.policy(x)
            logp = token_logprobs(logits / a.temperature, y)
            ref_logp = token_logprobs(self.ref(x) / a.temperature, y)
        values = values * mask
        kl = ((logp - ref_logp) * mask).sum(-1)  # (B,) per reply
        adv, returns = self._advantages(scores, logp, ref_logp, values, mask, kl)
        self._record(k, scores, kl, mask, time.perf_counter() - t0)
        return x, y, mask, logp, values, adv, returns, scores, kl

    def _advantages(self, scores, logp, ref_logp, values, mask, kl):
        a = self.a
        if a.advantage == "gae":
            adv, returns = L.gae(
                L.kl_rewards(scores, logp, ref_logp, mask, a.kl_coef), values, mask, a.gamma, a.lam
            )
            mean = L.masked_mean(adv, mask)
            std = L.masked_mean((adv - mean) ** 2, mask).sqrt()
            return (adv - mean) / (std + 1e-8) * mask, returns
        adv = L.group_advantages(scores - a.kl_coef * kl, a.group)[:, None] * mask
        return adv, torch.zeros_like(values)

    def _record(self, k: int, scores, kl, mask, seconds: float) -> None:
        row = {
            "rollout": k,
            "reward": scores.mean().item(),
            "kl": kl.mean().item(),
            "reply_tokens": mask.sum(-1).mean().item(),
            "seconds": seconds,
        }
        self.history.append(row)
        log.info(
            "rollout %d: reward %.3f | KL to reference %.3f | reply %.1f tokens | %.1fs",
            k,
            row["reward"],
            row["kl"],
            row["reply_tokens"],
            row["seconds"],
        )

    def loss(self, model: PolicyValue, batch):
        """The Trainer's loss on one minibatch: clipped surrogate (+ value loss); n = reply
        tokens."""
        x, y, mask, old_logp, old_values, adv, returns, scores, kl = batch
        logits, values = model(x)
        logp = token_logprobs(logits / self.a.temperature, y)
        loss, stats = L.ppo_policy_loss(logp, old_logp, adv, mask, self.a.clip)
        if self.a.advantage == "gae":
            value_loss = L.ppo_value_loss(values, old_values, returns, mask, self.a.value_clip)
            loss = loss + self.a.value_coef * value_loss
            stats["value_loss"] = value_loss.detach()
        self.last_approx_kl = stats["approx_kl"]
        return LossResult(loss, mask.sum(), {"reward": scores.mean(), "kl_ref": kl.mean(), **stats})
