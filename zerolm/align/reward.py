"""Reward model: a zerolm decoder (initialised from an SFT model) with a scalar head that scores a
whole conversation at its last token (the reply's end of turn, whatever the chat template);
trained on preference pairs with the pairwise loss -log sigmoid(r_chosen - r_rejected)
(zerolm/align/losses.py).

A model directory holds the decoder as usual (config.json, model.safetensors, tokenizer.json)
plus `reward_head.safetensors` (the (1, D) weight and bias of the head).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from zerolm.align.losses import pairwise_loss
from zerolm.align.stage import encoded_pairs, start_stage
from zerolm.data.collate import pad_right
from zerolm.data.loader import Shuffled
from zerolm.data.prefs import Preference
from zerolm.eval.mode import eval_mode
from zerolm.files import atomic_write_bytes
from zerolm.inspect.accounting import account
from zerolm.model import load_model, save_model
from zerolm.model.protocol import LanguageModel
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import render
from zerolm.train.fingerprint import stage_fingerprint
from zerolm.train.losses import LossResult
from zerolm.train.run import Stage, StageResult, open_out, run

HEAD_FILE = "reward_head.safetensors"
log = logging.getLogger(__name__)


class RewardModel(nn.Module):
    def __init__(self, body: LanguageModel):
        super().__init__()
        self.body = body
        self.cfg = body.cfg
        self.head = nn.Linear(body.cfg.d_model, 1)
        if (lm_head := getattr(body, "lm_head", None)) is not None:  # untied: a reward never
            lm_head.requires_grad_(False)  # reads it (and DDP needs every trained weight used)
        nn.init.zeros_(self.head.weight)  # every conversation starts at reward 0
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) real tokens -> (B,) rewards read at each last real
        token (causal attention: padding after it changes nothing)."""
        h = self.body.hidden(ids)  # (B, T, D)
        last = h[torch.arange(len(ids), device=ids.device), lengths - 1]  # (B, D)
        return self.head(last.float()).squeeze(-1)

    def save(self, out_dir: str | Path, tok: Tokenizer) -> Path:
        out = Path(out_dir)
        save_model(self.body, out, tok)
        tensors = {
            "weight": self.head.weight.detach().float().contiguous(),
            "bias": self.head.bias.detach().float(),
        }
        atomic_write_bytes(out / HEAD_FILE, save(tensors))
        return out

    @classmethod
    def load(cls, model_dir: str | Path) -> RewardModel:
        path = Path(model_dir) / HEAD_FILE
        if not path.is_file():
            raise ValueError(
                f"{model_dir} is not a reward model (no {HEAD_FILE}); train one with `zerolm "
                "reward`"
            )
        rm = cls(load_model(model_dir))
        head = load_file(str(path))
        rm.head.weight.data.copy_(head["weight"])
        rm.head.bias.data.copy_(head["bias"])
        return rm.eval()


def reply_ids(tok: Tokenizer, messages: Sequence[dict], reply: str) -> tuple[list[int], int]:
    """(ids of the conversation ending in `reply`, index of the reply's first token). The reply is
    the last run of assistant (loss-mask) tokens of the model's chat template, and the ids end
    with its last token, the end of turn: a foreign template's text after it (ChatML's newline)
    is left out, so a reward head reads the end of turn, as on zerolm's own template."""
    ids, mask, _ = render(tok, [*messages, {"role": "assistant", "content": reply}])
    end = next((i + 1 for i in range(len(mask) - 1, -1, -1) if mask[i]), 0)
    if not end:
        raise ValueError(
            "the chat template marks no token of the reply as the assistant's: check its "
            "{% generation %} blocks"
        )
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[:end], start


def encode_replies(
    tok: Tokenizer, pair: Preference, max_len: int
) -> list[tuple[list[int], int]] | None:
    """reply_ids of the chosen and of the rejected reply; None when either does not fit in
    max_len tokens."""
    out = [reply_ids(tok, pair.messages, reply) for reply in (pair.chosen, pair.rejected)]
    return None if any(len(ids) > max_len for ids, _ in out) else out


def encode_pair(
    tok: Tokenizer, pair: Preference, max_len: int
) -> tuple[list[int], list[int]] | None:
    """Token ids of the conversation ending in the chosen reply and in the rejected one (each
    up to its end of turn); None when either does not fit in max_len tokens."""
    out = encode_replies(tok, pair, max_len)
    return None if out is None else (out[0][0], out[1][0])


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with pad_id, lengths (B,)): the head reads each row's last real
    token, so what fills the rest is never seen."""
    return pad_right(seqs, pad_id), torch.tensor([len(s) for s in seqs])


def pair_collate(
    picked: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded pairs -> (ids, lengths) with the B chosen conversations first, the B rejected
    after."""
    return pad_batch([c for c, _ in picked] + [r for _, r in picked], pad_id)


def _pair_rewards(model: RewardModel, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), of a batch laid out as pair_collate makes it."""
    device = next(model.parameters()).device
    ids, lengths = (t.to(device) for t in batch)
    r = model(ids, lengths)  # (2B,)
    return r[: len(r) // 2], r[len(r) // 2 :]


def reward_loss(model: RewardModel, batch) -> LossResult:
    """The Trainer's loss: pairwise loss over the batch's pairs; counted: the pairs."""
    r_c, r_r = _pair_rewards(model, batch)
    return LossResult(pairwise_loss(r_c, r_r)[0], len(r_c))


@torch.no_grad()
def reward_eval(
    model: RewardModel, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16
) -> dict:
    """Held-out pairwise loss and accuracy (share of pairs where the chosen reply scores higher)."""
    loss_sum, acc_sum = 0.0, 0.0
    with eval_mode(model):
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            loss, acc = pairwise_loss(*_pair_rewards(model, pair_collate(chunk, pad_id)))
            loss_sum += loss.item() * len(chunk)
            acc_sum += acc.item() * len(chunk)
    return {"val_loss": loss_sum / len(pairs), "val_accuracy": acc_sum / len(pairs)}


# ---------------------------------------------------------------- the `zerolm reward` stage
def train_reward(cfg, progress: bool = True) -> StageResult:
    """`zerolm reward`: the SFT model + a scalar head, trained on preference pairs; OUT/model."""
    _, base, tok = start_stage(cfg, "the SFT model to start from")
    enc, summary = encoded_pairs(cfg, base, tok, encode_pair)
    open_out(cfg)
    rm = RewardModel(load_model(base))
    val, bs = enc["val"], cfg.train.batch_size
    stage = Stage(
        rm,
        Shuffled(enc["train"], bs, cfg.seed, collate=partial(pair_collate, pad_id=tok.pad_id)),
        reward_loss,
        save=partial(rm.save, tok=tok),
        evaluate=partial(reward_eval, pairs=val, pad_id=tok.pad_id, batch_size=bs) if val else None,
        final=partial(reward_eval, pairs=val, pad_id=tok.pad_id) if val else None,
        flops_per_token=account(rm.body)["train_flops_per_token"],
        fingerprint=stage_fingerprint(cfg, tok, ("align", "poems")),
        info=summary,
        row_groups=2,  # dpo_collate / pair_collate: B chosen rows, then B rejected
    )
    result = run(cfg, stage, progress)
    log.info("held-out pairwise accuracy: %s", result.final.get("val_accuracy"))
    return result
