import json
import math

import pytest
import torch

from zerolm.align.dpo import (
    DPOLoss,
    dpo_collate,
    dpo_eval,
    encode_dpo_pair,
    train_dpo,
    with_reference,
)
from zerolm.align.losses import sequence_logprobs
from zerolm.align.stage import reference_logits
from zerolm.config import LoRAConfig, TrainConfig, load_config
from zerolm.data.loader import Shuffled
from zerolm.data.prefs import Preference
from zerolm.eval.replies import response_batch
from zerolm.model import load_model, save_model
from zerolm.tokenizer.chat import render
from zerolm.train.trainer import Trainer
from zerolm.transforms.lora import apply_lora

POLITE, RUDE = "谢谢，很高兴帮你。", "走开，别烦我。"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, tiny_tokenizer):
    text = [
        "请帮我写一首诗",
        "Please help me",
        POLITE,
        RUDE,
        "今天天气很好",
        "Thank you very much",
    ] * 20
    tok = tiny_tokenizer("bpe", text)
    model = tiny_model("llama", tok.vocab_size, d_model=48, max_seq_len=48)
    root = tmp_path_factory.mktemp("dpo")
    save_model(model, root / "sft" / "model", tok)
    prompts = [
        f"问题{i}：{w}"
        for i, w in enumerate(["写诗", "天气", "help", "thanks", "你好", "再见"] * 5)
    ]
    pairs = [Preference(({"role": "user", "content": p},), POLITE, RUDE) for p in prompts]
    rows = [
        {"prompt": p.messages[0]["content"], "chosen": p.chosen, "rejected": p.rejected}
        for p in pairs
    ]
    (root / "pairs.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    return tok, root, [encode_dpo_pair(tok, p, 48) for p in pairs]


def test_response_batch_masks_exactly_the_reply_tokens(setup):
    tok, _, items = setup
    c, r, p = items[0]
    x, y, mask = response_batch([c, r], [p, p])
    assert x.shape == (2, max(len(c), len(r)) - 1)
    ids, loss_mask, _ = render(
        tok, [{"role": "user", "content": "问题0：写诗"}, {"role": "assistant", "content": POLITE}]
    )
    assert (
        ids == c and mask[0, : len(c) - 1].tolist() == loss_mask[1:]
    )  # the chat template's own loss mask
    assert (
        y[0, : len(c) - 1].tolist() == c[1:] and mask[0, len(c) - 1 :].sum() == 0
    )  # padding never counts
    with pytest.raises(ValueError, match="no response"):
        response_batch([c], [len(c)])


def test_policy_equal_to_reference_gives_log2_and_zero_margins(setup):
    _tok, root, items = setup
    model = load_model(root / "sft" / "model")
    cached = with_reference(items, reference_logits(model))
    out = dpo_eval(model, cached, DPOLoss(beta=0.1))
    assert out["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert out["val_margin"] == pytest.approx(0.0, abs=1e-6) and out["val_accuracy"] == 0.0
    x, y, mask, ref = dpo_collate(
        cached[:3]
    )  # the cache holds the summed reply log-probs, recomputed here
    assert torch.allclose(ref, sequence_logprobs(model(x), y, mask), atol=1e-5)


def _train(model, items, loss, steps=12, tmp=None):
    cfg = TrainConfig(
        steps=steps,
        batch_size=6,
        lr=3e-3,
        warmup_steps=2,
        precision="fp32",
        eval_every=1000,
        ckpt_every=1000,
        log_every=1000,
    )
    losses = []
    trainer = Trainer(
        model,
        cfg,
        tmp,
        batches=Shuffled(items, 6, collate=dpo_collate),
        loss_fn=loss,
        progress=False,
    )
    while trainer.step < steps:
        losses.append(trainer.train_step()["loss"])
    return losses


@pytest.mark.parametrize("lora", [False, True])
def test_cached_and_live_reference_train_identically(setup, tmp_path, lora):
    """Live reference log-probs (a frozen copy, or LoRA's base with adapters disabled) are the
    cached ones, step after step: the two modes give the same losses."""
    _tok, root, items = setup
    runs = {}
    for mode in ("cached", "live"):
        model = load_model(root / "sft" / "model")
        if lora:
            apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "up")), seed=0)
        if mode == "cached":
            data, loss = with_reference(items, reference_logits(model)), DPOLoss(0.5)
        else:
            ref_model = None if lora else load_model(root / "sft" / "model").requires_grad_(False)
            data, loss = items, DPOLoss(0.5, reference_logits(model, ref_model))
        runs[mode] = _train(model, data, loss, tmp=tmp_path / mode)
    assert runs["cached"] == pytest.approx(runs["live"], abs=1e-5)
    assert runs["cached"][0] == pytest.approx(math.log(2), abs=1e-5) and runs["cached"][-1] < 0.5


def test_dpo_stage_learns_the_preference_with_lora_and_keeps_the_base(setup, tmp_path):
    _tok, root, items = setup
    cfg = load_config(
        None,
        {
            "out_dir": str(tmp_path / "dpo"),
            "seed": 0,
            "align": {
                "base_model": str(root / "sft" / "model"),
                "data": [str(root / "pairs.jsonl")],
                "beta": 0.5,
                "val_fraction": 0.3,
                "reference_logprobs": "live",
            },
            "lora": {"rank": 4, "alpha": 8, "targets": ["q", "v", "up"]},
            "train": {
                "steps": 20,
                "batch_size": 6,
                "lr": 3e-3,
                "warmup_steps": 2,
                "precision": "fp32",
                "eval_every": 10,
                "ckpt_every": 1000,
                "log_every": 1000,
            },
        },
    )
    result = train_dpo(cfg, progress=False)
    assert (
        result.info["val_pairs"] > 0
        and result.final["val_accuracy"] == 1.0
        and result.final["val_margin"] > 1
    )
    assert (tmp_path / "dpo" / "adapters.safetensors").is_file()
    # the saved model prefers the chosen reply more than the base does
    base, aligned = load_model(root / "sft" / "model"), load_model(result.model_dir)
    x, y, mask, _ = dpo_collate(items[:4])
    with torch.no_grad():
        gap = [
            (lambda lp: (lp[:4] - lp[4:]).mean().item())(sequence_logprobs(m(x), y, mask))
            for m in (base, aligned)
        ]
    assert gap[1] > gap[0] + 2  # margin > 1 at beta 0.5: the log-prob gap grew by > 2 nats


def test_reference_with_another_tokenizer_is_a_clear_error(
    setup, tmp_path, tiny_model, tiny_tokenizer
):
    _tok, root, _ = setup
    other = tiny_tokenizer("char", [POLITE, RUDE] * 5)
    save_model(
        tiny_model("llama", other.vocab_size, d_model=48, max_seq_len=48),
        tmp_path / "ref",
        other,
    )
    cfg = load_config(
        None,
        {
            "out_dir": str(tmp_path / "x"),
            "align": {
                "base_model": str(root / "sft" / "model"),
                "data": [str(root / "pairs.jsonl")],
                "reference": str(tmp_path / "ref"),
            },
        },
    )
    with pytest.raises(ValueError, match="different tokenizer than the policy"):
        train_dpo(cfg, progress=False)
    assert not (tmp_path / "x").exists()
