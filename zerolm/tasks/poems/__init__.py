"""The Tang-poem task: requests to write a poem in a named form (requests.py), a rule-based
judge of the form (form.py), and preference pairs sampled and judged (pairs.py).

What the stages plug in by the task's name (`--sft.builtin=poems`, `--align.builtin=poems`,
`--align.reward=poem-form`; settings in the `[poems]` config section): the SFT conversations, the
preference pairs, the PPO prompts and the form reward. All read a prepared run's docs/ (the
bundled `tang` corpus keeps each poem's title and author), whose own train / val split they keep.
"""

from __future__ import annotations

from pathlib import Path

from zerolm.config import Config, PoemsConfig
from zerolm.data.prefs import Preference
from zerolm.data.prepare import read_docs
from zerolm.model.protocol import LanguageModel
from zerolm.tasks.poems.form import score
from zerolm.tasks.poems.pairs import poem_pairs
from zerolm.tasks.poems.requests import eval_requests, poem_instructions

SPLITS = ("train", "val")


def docs_dir(cfg: PoemsConfig, base_model: str | Path, levels: int = 1) -> Path:
    """poems.docs, else the docs/ of the run that made `base_model` (looked for up to `levels`
    directories above it: an SFT model's run may sit inside the pretraining run)."""
    candidates, up = [Path(cfg.docs)] if cfg.docs else [], Path(base_model)
    for _ in range(0 if cfg.docs else levels):
        up = up.parent
        candidates.append(up / "docs")
    for d in candidates:
        if (d / "train.jsonl").is_file() and (d / "val.jsonl").is_file():
            return d
    raise ValueError(
        "the 'poems' set needs prepared documents with title/author metadata (train.jsonl and "
        f"val.jsonl); none at {', '.join(str(c) for c in candidates)}: set --poems.docs=RUN/docs "
        "(a run prepared from --corpus tang)"
    )


def sft_conversations(cfg: Config) -> tuple[list, list]:
    """(train, val) chat examples: one per qualifying poem of the docs' train / val split (held
    out: the poems the base model did not pretrain on either)."""
    docs = docs_dir(cfg.poems, cfg.sft.base_model)
    train, val = (
        [x["messages"] for x in poem_instructions(read_docs(docs / f"{s}.jsonl"), seed=cfg.seed)]
        for s in SPLITS
    )
    return train, val


def requests(cfg: Config, split: str) -> list[dict]:
    """Poem requests (requests.eval_requests) from the align run's training or held-out docs."""
    limit = cfg.poems.requests if split == "train" else cfg.poems.val_requests
    docs = docs_dir(cfg.poems, cfg.align.base_model, levels=2)
    return eval_requests(read_docs(docs / f"{split}.jsonl"), cfg.seed, limit)


def preference_pairs(
    cfg: Config, model: LanguageModel, tok, split: str
) -> tuple[list[Preference], dict]:
    """(pairs, counts) sampled from `model` on the requests of `split` and judged (pairs.py)."""
    return poem_pairs(model, tok, requests(cfg, split), samples=cfg.poems.samples, seed=cfg.seed)


def form_reward(prompt: dict, reply: str) -> float:
    """The judge's partial credit for the form the poem request asked for (1.0: exactly that
    form)."""
    form = prompt["form"]
    return score(reply, form["lines"], form["chars"])
