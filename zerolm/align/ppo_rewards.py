"""The PPO stage's reward: scores(prompts, replies) -> one float per reply.

Rewards (`align.reward`): "poem-form" (the form judge's partial-credit score, zerolm/tasks/
poems/, for poem requests), a reward model directory (`zerolm reward`), or "module:function" /
"path/file.py:function", a Python callable `fn(prompt: dict, reply: str) -> float` where prompt
holds "messages" and the prompt row's other fields. A rollout whose reward raises, or returns a
non-finite number, is reported and skipped; ten in a row stop the run.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from zerolm.align.reward import RewardModel, pad_batch, reply_ids
from zerolm.tasks import REWARDS
from zerolm.tokenizer import Tokenizer, check_tokenizers


class ModelReward:
    """A trained reward model (zerolm/align/reward.py) scoring each conversation + reply."""

    def __init__(self, model_dir: str | Path):
        self.rm, self.tok = RewardModel.load(model_dir), Tokenizer.load(model_dir)

    @torch.no_grad()
    def __call__(self, prompts: list[dict], replies: list[str]) -> list[float]:
        window = self.rm.cfg.max_seq_len
        seqs = [
            reply_ids(self.tok, p["messages"], r)[0][-window:] for p, r in zip(prompts, replies)
        ]
        return self.rm(*pad_batch(seqs, self.tok.pad_id)).tolist()


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
