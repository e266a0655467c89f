import json

import pytest

from zerolm.align.reward import RewardModel, train_reward
from zerolm.config import load_config
from zerolm.model import save_model
from zerolm.tasks.poems.pairs import poem_pairs
from zerolm.tasks.poems.requests import poem_instructions

DOCS = [
    {
        "text": "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
        "title": "静夜思",
        "author": "李白",
    },
    {
        "text": "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
        "title": "登鹳雀楼",
        "author": "王之涣",
    },
    {
        "text": "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
        "title": "春晓",
        "author": "孟浩然",
    },
]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model, tiny_tokenizer):
    root = tmp_path_factory.mktemp("rm")
    text = [d["text"] for d in DOCS] * 10 + [
        "谢谢，很高兴帮你。",
        "走开，别烦我。",
        "Please help me. Thank you!",
    ] * 10
    tok = tiny_tokenizer("bpe", text, vocab_size=400)
    model = tiny_model("llama", tok.vocab_size, d_model=48, max_seq_len=128)
    save_model(model, root / "sft" / "model", tok)
    (root / "docs").mkdir()
    for split in ("train", "val"):
        (root / "docs" / f"{split}.jsonl").write_text(
            "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS)
        )
    rows = [
        {"prompt": f"问题{i}", "chosen": "谢谢，很高兴帮你。", "rejected": "走开，别烦我。"}
        for i in range(40)
    ]
    (root / "pairs.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    return root, model, tok


def test_poem_pairs_take_the_real_poem_over_failed_samples_and_rank_by_the_judge(base):
    _, model, tok = base
    items = list(poem_instructions(DOCS))
    pairs, counts = poem_pairs(model, tok, items, samples=3, max_new_tokens=20)
    assert counts["samples"] == 9 and counts["failed"] == 9  # a random model never writes the form
    reference = [p for p in pairs if p.where == "poems:reference"]
    assert len(reference) == 9 and all(
        p.chosen == items[0]["messages"][-1]["content"] for p in reference[:3]
    )
    for p in pairs:
        assert p.chosen != p.rejected and p.messages[-1]["role"] == "user"


def test_reward_stage_end_to_end(base, tmp_path):
    root, _, _ = base
    cfg = load_config(
        None,
        {
            "out_dir": str(tmp_path / "rm"),
            "seed": 0,
            "align": {
                "base_model": str(root / "sft" / "model"),
                "data": [str(root / "pairs.jsonl")],
                "builtin": ["poems"],
                "val_fraction": 0.25,
            },
            "poems": {"requests": 3, "val_requests": 3},
            "train": {
                "steps": 30,
                "batch_size": 8,
                "lr": 3e-3,
                "warmup_steps": 3,
                "precision": "fp32",
                "eval_every": 1000,
                "ckpt_every": 1000,
                "log_every": 1000,
            },
        },
    )
    result = train_reward(cfg, progress=False)
    assert result.info["pairs"]["poems"]["train"]["reference"] >= 3
    assert result.info["val_pairs"] > 0 and result.final["val_accuracy"] > 0.9, result
    rm = RewardModel.load(result.model_dir)
    assert rm.head.weight.abs().sum() > 0


@pytest.mark.parametrize(
    "align, match",
    [
        ({}, "no base model"),
        ({"base_model": "BASE"}, "no preference pairs"),
        ({"base_model": "BASE", "builtin": ["nope"]}, "unknown preference set 'nope'"),
        ({"base_model": "BASE", "builtin": ["poems"], "poems": {"docs": "/nowhere"}}, "poems.docs"),
    ],
)
def test_reward_stage_input_errors(base, tmp_path, align, match):
    root, _, _ = base
    align = {k: (str(root / "sft" / "model") if v == "BASE" else v) for k, v in align.items()}
    poems = align.pop("poems", {})  # the poem task's own section
    cfg = load_config(None, {"out_dir": str(tmp_path / "x"), "align": align, "poems": poems})
    with pytest.raises(ValueError, match=match):
        train_reward(cfg, progress=False)
    assert not (tmp_path / "x").exists()  # nothing written
