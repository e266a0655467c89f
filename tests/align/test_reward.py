from functools import partial

import pytest
import torch

from zerolm.align.reward import (
    RewardModel,
    encode_pair,
    pad_batch,
    pair_collate,
    reward_eval,
    reward_loss,
)
from zerolm.config import TrainConfig
from zerolm.data.loader import Shuffled
from zerolm.data.prefs import Preference
from zerolm.model import build_model
from zerolm.train.trainer import Trainer

POLITE, RUDE = "谢谢，很高兴帮你。", "走开，别烦我。"


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_tokenizer):
    text = [
        "请帮我写一首诗",
        "Please help me",
        POLITE,
        RUDE,
        "今天天气很好",
        "Thank you very much",
    ] * 20
    tok = tiny_tokenizer("bpe", text)
    body = tiny_model("llama", tok.vocab_size, d_model=48, max_seq_len=48)
    prompts = [
        f"问题{i}：{w}"
        for i, w in enumerate(["写诗", "天气", "help", "thanks", "你好", "再见"] * 4)
    ]
    pairs = [
        Preference(
            ({"role": "user", "content": p},),
            POLITE if i % 2 else POLITE + "！",
            RUDE if i % 3 else RUDE + "！",
        )
        for i, p in enumerate(prompts)
    ]
    return tok, body, pairs


def test_reward_is_read_at_the_last_real_token_and_padding_changes_nothing(setup):
    tok, body, pairs = setup
    rm = RewardModel(body).eval()
    torch.nn.init.normal_(rm.head.weight, generator=torch.Generator().manual_seed(0))
    c, r = encode_pair(tok, pairs[0], 48)
    ids, lengths = pad_batch([c, r], tok.pad_id)
    with torch.no_grad():
        both = rm(ids, lengths)
        alone = [rm(torch.tensor([s]), torch.tensor([len(s)])).item() for s in (c, r)]
        h = body.hidden(torch.tensor([c]))[0, -1]
    assert both.tolist() == pytest.approx(alone, abs=1e-5)
    assert alone[0] == pytest.approx((h @ rm.head.weight[0] + rm.head.bias[0]).item(), abs=1e-5)
    assert encode_pair(tok, pairs[0], 5) is None  # does not fit: the caller skips and counts it


def test_training_separates_chosen_from_rejected_on_held_out_pairs(setup, tmp_path):
    tok, body, pairs = setup
    enc = [encode_pair(tok, p, 48) for p in pairs]
    train, val = enc[:18], enc[18:]
    rm = RewardModel(build_model(body.cfg, vocab_size=tok.vocab_size, seed=1))
    before = reward_eval(rm, val, tok.pad_id)
    assert before["val_loss"] == pytest.approx(
        0.6931, abs=1e-3
    )  # zero head: every reward 0, loss log 2
    cfg = TrainConfig(
        steps=40,
        batch_size=6,
        lr=3e-3,
        warmup_steps=4,
        precision="fp32",
        eval_every=1000,
        ckpt_every=1000,
        log_every=1000,
    )
    Trainer(
        rm,
        cfg,
        tmp_path / "run",
        batches=Shuffled(train, 6, collate=partial(pair_collate, pad_id=tok.pad_id)),
        loss_fn=reward_loss,
        progress=False,
    ).fit()
    after = reward_eval(rm, val, tok.pad_id)
    assert after["val_accuracy"] == 1.0 and after["val_loss"] < 0.1, after
    rm.save(tmp_path / "rm", tok)
    again = RewardModel.load(tmp_path / "rm")
    ids, lengths = pad_batch(val[0], tok.pad_id)
    with torch.no_grad():
        assert torch.allclose(again(ids, lengths), rm.eval()(ids, lengths), atol=1e-6)
    with pytest.raises(ValueError, match="not a reward model"):
        RewardModel.load(tmp_path / "run")
