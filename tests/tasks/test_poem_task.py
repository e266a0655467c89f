"""The poem task as the stages plug it in: docs lookup, SFT conversations, requests, reward."""

import json
from itertools import islice

import pytest

from zerolm.config import load_config
from zerolm.data.sources import read_corpus
from zerolm.finetune.sft import load_sources
from zerolm.tasks import REWARDS, TASKS, poems
from zerolm.tasks.poems.form import score
from zerolm.tasks.poems.requests import eval_requests, poem_instructions


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as `zerolm prepare --corpus tang` leaves it: docs/{train,val}.jsonl."""
    root = tmp_path_factory.mktemp("run")
    docs = [{"text": d.text, **d.meta} for d in islice(read_corpus("tang"), 400)]
    (root / "docs").mkdir()
    for split, part in (("train", docs[:300]), ("val", docs[300:])):
        with open(root / "docs" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in part)
    (root / "model").mkdir()
    return root, docs


def test_the_registry_names_the_task_and_its_reward():
    assert TASKS["poems"] is poems and REWARDS["poem-form"] is poems.form_reward


def test_docs_dir_beside_the_base_model_or_as_configured(run, tmp_path):
    root, _ = run
    cfg = load_config(None, {})
    assert poems.docs_dir(cfg.poems, root / "model") == root / "docs"
    assert poems.docs_dir(cfg.poems, root / "model" / "sub", levels=2) == root / "docs"
    with pytest.raises(ValueError, match="set --poems.docs=RUN/docs"):
        poems.docs_dir(cfg.poems, root / "model" / "sub")  # one level only (the sft stage)
    explicit = load_config(None, {"poems": {"docs": str(root / "docs")}})
    assert poems.docs_dir(explicit.poems, tmp_path / "elsewhere") == root / "docs"


def test_sft_conversations_follow_the_docs_split(run):
    root, docs = run
    cfg = load_config(None, {"sft": {"base_model": str(root / "model"), "builtin": ["poems"]}})
    train, val = poems.sft_conversations(cfg)
    assert train == [x["messages"] for x in poem_instructions(docs[:300], seed=cfg.seed)]
    assert val == [x["messages"] for x in poem_instructions(docs[300:], seed=cfg.seed)]
    assert train and val
    got_train, got_val, counts = load_sources(cfg)  # the sft stage, by the task's name
    assert (got_train, got_val) == (train, val) and counts["poems"]["train"] == len(train)


def test_requests_and_the_form_reward(run):
    root, docs = run
    cfg = load_config(
        None,
        {"align": {"base_model": str(root / "model")}, "poems": {"requests": 5, "val_requests": 3}},
    )
    assert poems.requests(cfg, "train") == eval_requests(docs[:300], cfg.seed, 5)
    val = poems.requests(cfg, "val")
    assert len(val) == 3
    q, answer = val[0], val[0]["messages"][-1]["content"]
    assert poems.form_reward(q, answer) == 1.0
    assert poems.form_reward(q, answer[:-1]) == score(
        answer[:-1], **{k: q["form"][k] for k in ("lines", "chars")}
    )
