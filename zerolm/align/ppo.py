"""RLHF with PPO (Schulman et al. 2017; Ouyang et al. 2022), or GRPO's critic-free variant, as a
stage on the one Trainer.

Each rollout: `rollout_prompts` prompts (each `group` times) are answered by the policy through
the engine (batched, KV-cached, seeded); a reward scores every reply; one forward pass gives the
policy's log-probs and values and the frozen reference's log-probs. Then
- `gae`: per-token rewards are -kl_coef * (log pi - log ref), plus the score at the last token;
  GAE turns them and the value head's estimates into advantages (whitened over the rollout);
- `group` (GRPO): each reply's score minus kl_coef * its summed KL, standardised within its
  prompt's group, is the advantage of all its tokens; no value head is trained.
The rollout is cut into minibatches of train.batch_size and trained for `ppo_epochs` epochs with
the clipped surrogate (+ value_coef * the clipped value loss); a rollout's remaining minibatches
are dropped once one's approximate KL to the rollout policy exceeds `target_kl`. Every Trainer
step is one minibatch; checkpoints resume at the start of the rollout they were taken in.

Rewards: ppo_rewards.py; prompts: ppo_prompts.py; rollouts and their loss: ppo_rollouts.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from functools import partial
from typing import cast

from torch import nn

from zerolm.align.ppo_prompts import load_prompts
from zerolm.align.ppo_rewards import load_reward
from zerolm.align.ppo_rollouts import Rollouts
from zerolm.align.stage import reference_dir, reference_logits, start_stage
from zerolm.dist.group import env_world_size
from zerolm.eval.replies import reply_kl, sample_replies
from zerolm.inspect.accounting import account
from zerolm.model import load_model, read_model_config
from zerolm.model.protocol import LanguageModel
from zerolm.tokenizer import Tokenizer
from zerolm.train.fingerprint import stage_fingerprint
from zerolm.train.run import Stage, StageResult, load_trainable, open_out, run, save_trainable

log = logging.getLogger(__name__)


class PolicyValue(nn.Module):
    """The policy (a zerolm decoder, LoRA-wrapped or not) with a scalar value head reading its final
    hidden states, detached: the value loss trains the head alone and never moves the policy (on
    the speedrun model a shared body let the value loss drift the policy: KL to the reference grew
    with no gain in reward). The head starts at zero, so the first values are 0."""

    def __init__(self, body: LanguageModel):
        super().__init__()
        self.body, self.cfg = body, body.cfg
        self.value_head = nn.Linear(body.cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ids):
        """ids (B, T) -> (logits (B, T, V), values (B, T) in float32)."""
        h = self.body.hidden(ids)
        return self.body.logits(h), self.value_head(h.detach().float()).squeeze(-1)


def ppo_eval(
    model: PolicyValue,
    prompts: list[dict],
    reward: Callable,
    ref: Callable,
    tok: Tokenizer,
    max_new_tokens: int,
    seed: int,
) -> dict:
    """Held-out prompts: the mean reward of replies sampled at temperature 1 and, on those same
    replies, the KL to the reference."""
    seqs, lens, replies = sample_replies(
        model.body, tok, [p["messages"] for p in prompts], max_new_tokens=max_new_tokens, seed=seed
    )
    try:
        score = sum(float(s) for s in reward(prompts, replies)) / len(prompts)
    except Exception as e:  # reported: not worth stopping training for
        log.warning("held-out evaluation: the reward function failed (%s: %s)", type(e).__name__, e)
        score = math.nan
    return {
        "val_reward": score,
        "val_kl": reply_kl(model.body, ref, seqs, lens)["kl"],
    }  # the same replies


def train_ppo(cfg, progress: bool = True) -> StageResult:
    """`zerolm ppo`: the base (SFT) model trained against a reward with PPO or GRPO; OUT/model."""
    if env_world_size() > 1:  # its rollouts are sampled by one process
        raise ValueError(
            f"zerolm ppo runs in one process, not under torchrun (WORLD_SIZE={env_world_size()}): "
            "start it without torchrun"
        )
    _, base, tok = start_stage(
        cfg, "the SFT model: the policy's start and, by default, the reference"
    )
    ref_dir = reference_dir(cfg)
    reward = load_reward(cfg.align.reward, base)
    train_p, val_p, counts = load_prompts(cfg, tok, read_model_config(base).max_seq_len)
    log.info("prompts: %s; train %d, val %d", counts, len(train_p), len(val_p))
    body, lora = load_trainable(cfg, base)
    policy = PolicyValue(cast(LanguageModel, body))  # the policy: a decoder
    ref_model = (
        load_model(ref_dir).requires_grad_(False) if ref_dir != base or lora is None else None
    )
    ref = reference_logits(body, ref_model)
    if cfg.train.precision == "auto":  # rollout and training log-probs must share one precision
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
    open_out(cfg)
    rollouts = Rollouts(policy, ref, tok, train_p, reward, cfg, cfg.train.precision)
    a = cfg.align
    evaluate = (
        partial(
            ppo_eval,
            prompts=val_p,
            reward=reward,
            ref=ref,
            tok=tok,
            max_new_tokens=a.max_new_tokens,
            seed=cfg.seed,
        )
        if val_p
        else None
    )
    stage = Stage(
        policy,
        rollouts,
        rollouts.loss,
        save=partial(save_trainable, body, tok=tok),
        evaluate=evaluate,
        final=evaluate,
        flops_per_token=account(body)["train_flops_per_token"],
        fingerprint=stage_fingerprint(cfg, tok, ("align", "lora", "poems")),
        info={"lora": lora, "reference": str(ref_dir), "prompts": counts},
    )
    result = run(cfg, stage, progress)
    first, last = rollouts.history[:3], rollouts.history[-3:]
    result.info |= {
        "rollouts": len(rollouts.history),
        "skipped_rollouts": rollouts.skipped,
        "reward_first": sum(r["reward"] for r in first) / max(len(first), 1),
        "reward_last": sum(r["reward"] for r in last) / max(len(last), 1),
    }
    return result
