import json
import subprocess
import sys

import pytest

from zerolm.config import load_config
from zerolm.finetune.sft import sft
from zerolm.infer.chat import chat_request, replies
from zerolm.infer.sampling import SamplingParams
from zerolm.model import load_model, save_model
from zerolm.tokenizer import Tokenizer

CONVS = [
    [
        {"role": "user", "content": "写诗"},
        {"role": "assistant", "content": "床前明月光，疑是地上霜。"},
    ],
    [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hi, how are you?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "举头"},
        {"role": "assistant", "content": "望明月。"},
        {"role": "user", "content": "低头"},
        {"role": "assistant", "content": "思故乡。"},
    ],
]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model, tiny_tokenizer):
    root = tmp_path_factory.mktemp("sft")
    text = [m["content"] for c in CONVS for m in c] * 10
    tok = tiny_tokenizer("bpe", text)
    model = tiny_model("llama", tok.vocab_size, d_model=64)
    save_model(model, root / "base", tok)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in CONVS))
    return root


def run(base, out, **over):
    values = {
        "out_dir": str(base / out),
        "sft": {
            "base_model": str(base / "base"),
            "data": [str(base / "chat.jsonl")],
            "val_fraction": 0.0,
        },
        "train": {
            "steps": 60,
            "batch_size": 3,
            "lr": 1e-2,
            "warmup_steps": 5,
            "precision": "fp32",
            "eval_every": 1000,
            "ckpt_every": 1000,
            "log_every": 1000,
        },
    }
    for k, v in over.items():
        values.setdefault(k, {}).update(v)
    return sft(load_config(None, values), progress=False)


@pytest.fixture(scope="module")
def full(base):
    return run(base, "full")


def test_sft_memorises_a_tiny_set_and_answers_it(base, full):
    result = full
    rows = [json.loads(x) for x in (base / "full" / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 3.0 and rows[-1]["loss"] < 0.05, (rows[0]["loss"], rows[-1]["loss"])
    model, tok = load_model(result.model_dir), Tokenizer.load(result.model_dir)
    got = replies(
        model,
        tok,
        [CONVS[0][:1], CONVS[1][:1]],
        chat_request(tok, 40, SamplingParams(temperature=0)),
    )
    assert got == [CONVS[0][1]["content"], CONVS[1][1]["content"]]


def test_lora_sft_trains_only_adapters_and_saves_them(base):
    result = run(
        base,
        "lora",
        lora={
            "rank": 8,
            "alpha": 16.0,
            "targets": ["q", "k", "v", "o", "up", "gate", "down", "lm_head"],
        },
    )
    assert result.info["lora"]["trainable"] < result.info["lora"]["total"] / 5
    assert (base / "lora" / "adapters.safetensors").is_file()
    rows = [json.loads(x) for x in (base / "lora" / "train_log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] / 3
    merged = load_model(result.model_dir)  # adapters merged: a plain model directory
    assert not any("lora" in k for k in merged.state_dict())


def test_sft_input_errors(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVS[0]}, ensure_ascii=False) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        run(base, "bad", sft={"data": [str(bad)]})
    with pytest.raises(ValueError, match="LoRA target 'qkv' matches no module"):
        run(base, "badlora", lora={"rank": 4, "targets": ["qkv"]})
    with pytest.raises(ValueError, match="unknown builtin SFT set 'wiki'"):
        run(base, "badset", sft={"data": [], "builtin": ["wiki"]})
    assert not any((base / d).exists() for d in ("bad", "badlora", "badset"))  # nothing written


@pytest.mark.slow
def test_chat_cli_one_shot_and_repl(full):
    model = full.model_dir
    one = subprocess.run(
        [sys.executable, "-m", "zerolm", "chat", model, "--prompt", "写诗", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() == CONVS[0][1]["content"]
    script = (
        "/temperature 0\n/top_p 2\nHello there!\n/history\n/reset\n"
        "/system Be brief.\n举头\n低头\n/quit\n"
    )
    repl = subprocess.run(
        [sys.executable, "-m", "zerolm", "chat", model],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert repl.returncode == 0, repl.stderr
    assert repl.stdout.replace("> ", "").split("\n")[:3] == [
        "Hi, how are you?",
        "望明月。",
        "思故乡。",
    ]
    assert "top_p must be in (0, 1]" in repl.stderr  # a bad value is reported, the session goes on
    assert "[user] Hello there!" in repl.stderr and "(conversation cleared)" in repl.stderr


def test_pretraining_mix_adds_lambda_times_the_lm_loss(tiny_corpus, tiny_model):
    import torch

    from zerolm.data.loader import TokenBatches
    from zerolm.data.sft import SFTBatches, encode_conversations
    from zerolm.finetune.sft import MixedBatches, mixed_loss
    from zerolm.train.losses import lm_loss

    tok = Tokenizer.load(tiny_corpus / "run" / "tokenizer")
    model = tiny_model("llama", tok.vocab_size, max_seq_len=32)
    examples, _ = encode_conversations(
        tok,
        [[{"role": "user", "content": "abc"}, {"role": "assistant", "content": "dead beef"}]] * 6,
        32,
    )
    mixed = MixedBatches(
        SFTBatches(examples, batch_size=2, seq_len=32),
        TokenBatches(tiny_corpus / "run" / "shards", batch_size=2, seq_len=32),
    )
    batch = next(mixed)
    ft, pt = lm_loss(model, batch[0]), lm_loss(model, batch[1])
    (ft, n), pt = (ft.loss, ft.n), pt.loss
    mixed_out = mixed_loss(model, batch, pt_weight=0.3)
    total, n_mixed = mixed_out.loss, mixed_out.n
    assert n_mixed == n and torch.allclose(total, ft + 0.3 * pt)
    state = mixed.state_dict()
    after = next(mixed)
    mixed.load_state_dict(state)
    again = next(mixed)
    assert all(torch.equal(a, b) for a, b in zip(after[0] + after[1], again[0] + again[1]))


def test_history_drops_oldest_turns_but_keeps_the_system_message(base):
    from zerolm.infer.chat import fit_history
    from zerolm.tokenizer.chat import prompt_ids

    tok = Tokenizer.load(base / "base")
    msgs = CONVS[2] + [{"role": "user", "content": "Hello there!"}]
    assert fit_history(tok, msgs, 1000) == msgs
    room = len(prompt_ids(tok, [msgs[0], *msgs[3:]]))  # fits from the second exchange on
    assert fit_history(tok, msgs, room) == [msgs[0], *msgs[3:]]
    assert fit_history(tok, msgs, 3) == [msgs[0], msgs[-1]]  # the newest message always stays
