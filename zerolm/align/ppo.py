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

Rewards (`align.reward`): "poem-form" (the form judge's partial-credit score, zerolm/tasks/
poems/, for poem requests), a reward model directory (`zerolm reward`), or "module:function" /
"path/file.py:function", a Python callable `fn(prompt: dict, reply: str) -> float` where prompt
holds "messages" and the prompt row's other fields. A rollout whose reward raises, or returns a
non-finite number, is reported and skipped; ten in a row stop the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from zerolm.align import losses as L
from zerolm.align.reward import RewardModel, pad_batch
from zerolm.align.stage import reference_dir, reference_logits, start_stage
from zerolm.data.prefs import BUILTIN_PAIRS, read_builtin_pairs, read_prompts
from zerolm.data.split import split_by_hash
from zerolm.eval.mode import eval_mode
from zerolm.eval.replies import reply_kl, response_batch, sample_replies, token_logprobs
from zerolm.inspect.accounting import account
from zerolm.model import load_model, read_model_config
from zerolm.model.protocol import LanguageModel
from zerolm.tasks import REWARDS, TASKS
from zerolm.tokenizer import Tokenizer, check_tokenizers
from zerolm.tokenizer.chat import prompt_ids, render
from zerolm.train.fingerprint import stage_fingerprint
from zerolm.train.losses import LossResult
from zerolm.train.run import Stage, StageResult, load_trainable, open_out, run, save_trainable
from zerolm.train.trainer import autocast

log = logging.getLogger(__name__)
MAX_FAILED_ROLLOUTS = 10


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


# ---------------------------------------------------------------- rewards
class ModelReward:
    """A trained reward model (zerolm/align/reward.py) scoring each conversation + reply."""

    def __init__(self, model_dir: str | Path):
        self.rm, self.tok = RewardModel.load(model_dir), Tokenizer.load(model_dir)

    @torch.no_grad()
    def __call__(self, prompts: list[dict], replies: list[str]) -> list[float]:
        window = self.rm.cfg.max_seq_len
        seqs = [
            render(self.tok, [*p["messages"], {"role": "assistant", "content": r}])[0][-window:]
            for p, r in zip(prompts, replies)
        ]
        return self.rm(*pad_batch(seqs)).tolist()


def per_reply(fn: Callable) -> Callable:
    def scores(prompts, replies):
        return [float(fn(p, r)) for p, r in zip(prompts, replies)]

    return scores


def load_reward(spec: str, policy_dir: Path) -> Callable[[list[dict], list[str]], list[float]]:
    """`align.reward` -> scores(prompts, replies) (see the module docstring)."""
    if spec in REWARDS:
        return per_reply(REWARDS[spec])
    path = Path(spec)
    if path.is_dir():
        check_tokenizers(policy_dir, path, "reward model")
        return ModelReward(path)
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ValueError(
            f"align.reward={spec!r}: give 'poem-form', a reward model directory (zerolm reward), "
            "or module:function / path/file.py:function for a Python callable fn(prompt, reply) "
            "-> float"
        )
    try:
        if module.endswith(".py"):
            loaded = importlib.util.spec_from_file_location(Path(module).stem, module)
            if loaded is None or loaded.loader is None or not Path(module).is_file():
                raise ImportError(f"no file {module}")
            mod = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"align.reward={spec!r}: cannot import {module!r} ({e})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"align.reward={spec!r}: {module!r} has no callable {name!r}")
    return per_reply(fn)


# ---------------------------------------------------------------- prompts
def _conversation(row: dict) -> str:
    """The text a prompt row is split by (its messages, as the pairs' hash includes them)."""
    return str(row["messages"])


def load_prompts(cfg, tok: Tokenizer, window: int) -> tuple[list[dict], list[dict], dict]:
    """(train, val) prompts: poem requests (align.builtin=poems: the run's training / held-out
    documents), the conversations of the other bundled pair sets, and align.data rows (split by
    a hash, as the pairs are). Prompts leaving under 8 tokens of room to reply are dropped."""

    a = cfg.align
    if not a.data and not a.builtin:
        raise ValueError(
            "no prompts: give --align.builtin=poems and/or --align.data=FILE.jsonl (rows with "
            "'prompt')"
        )
    train: list[dict] = []
    val: list[dict] = []
    counts: dict[str, int] = {}
    for name in a.builtin:
        if name in TASKS:
            for split, out in (("train", train), ("val", val)):
                got = [
                    {"messages": q["messages"][:-1], "form": q["form"], "kind": q["kind"]}
                    for q in TASKS[name].requests(cfg, split)
                ]
                out += got
                counts[f"{name} ({split})"] = len(got)
        elif name in BUILTIN_PAIRS:
            rows = [
                {"messages": list(p.messages), "where": p.where} for p in read_builtin_pairs(name)
            ]
            rows = list({_conversation(r): r for r in rows}.values())  # one per conversation
            t, v = split_by_hash(rows, _conversation, a.val_fraction)
            train += t
            val += v
            counts[name] = len(rows)
        else:
            raise ValueError(
                f"unknown prompt set {name!r}; bundled: poems, {', '.join(BUILTIN_PAIRS)}"
            )
    for path in a.data:
        rows = read_prompts(path)
        t, v = split_by_hash(rows, _conversation, a.val_fraction)
        train += t
        val += v
        counts[str(path)] = len(rows)

    def fits(p):
        return len(prompt_ids(tok, p["messages"])) <= window - 8

    n = len(train) + len(val)
    train, val = [p for p in train if fits(p)], [p for p in val if fits(p)]
    if dropped := n - len(train) - len(val):
        counts["too long (dropped)"] = dropped
    if not train:
        raise ValueError(f"no training prompts fit the {window}-token window with room to reply")
    if a.reward == "poem-form" and (bad := next((p for p in train + val if "form" not in p), None)):
        raise ValueError(
            f"align.reward='poem-form' scores poem requests, but {bad.get('where', 'a prompt')} is "
            "not one: use --align.builtin=poems alone, or another reward (a reward model, "
            "module:function)"
        )
    return train, val, counts


# ---------------------------------------------------------------- rollouts
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
