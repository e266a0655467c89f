import dataclasses
import json
import logging
import re

import pytest
import torch

from zerolm.align.ppo import PolicyValue, train_ppo
from zerolm.align.ppo_rewards import load_reward
from zerolm.align.stage import reference_logits
from zerolm.config import LoRAConfig, load_config
from zerolm.eval.replies import sample_replies
from zerolm.infer.sampling import SamplingParams, sample
from zerolm.model import load_model, save_model
from zerolm.tokenizer import END, EOS
from zerolm.tokenizer.chat import prompt_ids

TEXT = [
    "请帮我写一首诗",
    "Please help me write a poem",
    "谢谢，很高兴帮你。",
    "今天天气很好",
    "Thank you very much",
] * 20
REWARDS = '''
def ascii_share(prompt, reply):
    """Dense and easy to raise: the share of the reply's characters that are ASCII."""
    return sum(c.isascii() for c in reply) / max(len(reply), 1)

calls = 0

def flaky(prompt, reply):
    global calls
    calls += 1
    if calls in (1, 40):  # rollout 0 (calls 1) and rollout 3 (calls 34-40) fail
        raise RuntimeError("scoring service unavailable")
    return ascii_share(prompt, reply)

def broken(prompt, reply):
    raise KeyError("no such field")
'''


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model, tiny_tokenizer):
    root = tmp_path_factory.mktemp("ppo")
    tok = tiny_tokenizer("bpe", TEXT)
    model = tiny_model("llama", tok.vocab_size, d_model=48)
    save_model(model, root / "sft" / "model", tok)
    rows = [{"prompt": f"问题{i}：写一首诗"} for i in range(24)]
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    (root / "rewards.py").write_text(REWARDS)
    return root, model, tok


def test_rollouts_through_the_engine_match_sampling_without_a_cache(base):
    """sample_replies (batched prompts of different lengths, KV cache, seeded) gives the tokens a
    naive loop gives: full recomputation of every sequence at every step, same generator."""
    _, model, tok = base
    convs = [
        [{"role": "user", "content": t}]
        for t in ("写诗", "Please help me write a poem", "今天天气很好")
    ]
    seqs, lens, texts = sample_replies(
        model, tok, convs, max_new_tokens=12, temperature=1.0, seed=7
    )
    prompts = [prompt_ids(tok, c) for c in convs]
    assert lens == [len(p) for p in prompts]
    gen = torch.Generator().manual_seed(7)
    rows, stops, done = (
        [list(p) for p in prompts],
        {tok.token_id(END), tok.token_id(EOS)},
        [False] * 3,
    )
    outs = [[] for _ in prompts]
    with torch.no_grad():
        for _ in range(12):
            logits = torch.stack([model(torch.tensor([r]))[0, -1] for r in rows])  # no cache
            nxt = sample(logits, SamplingParams(temperature=1.0), gen).tolist()
            for i, t in enumerate(nxt):
                rows[i].append(t)
                if not done[i]:
                    outs[i].append(t)
                    done[i] = t in stops
            if all(done):
                break
    assert seqs == [p + o for p, o in zip(prompts, outs)]
    assert texts == [tok.decode([t for t in o if t not in stops]) for o in outs]


def _cfg(root, out, steps=24, **align):
    return load_config(
        None,
        {
            "out_dir": str(out),
            "seed": 0,
            "align": {
                "base_model": str(root / "sft" / "model"),
                "data": [str(root / "prompts.jsonl")],
                "reward": f"{root / 'rewards.py'}:ascii_share",
                "rollout_prompts": 16,
                "max_new_tokens": 12,
                "val_fraction": 0.2,
                "kl_coef": 0.01,
                **align,
            },
            "train": {
                "steps": steps,
                "batch_size": 8,
                "lr": 1e-2,
                "warmup_steps": 2,
                "schedule": "constant",
                "precision": "fp32",
                "eval_every": 1000,
                "ckpt_every": 1000,
                "log_every": 1000,
            },
        },
    )


@pytest.mark.parametrize(
    "align", [{}, {"advantage": "group", "group": 4, "rollout_prompts": 4}], ids=["ppo", "grpo"]
)
def test_ppo_raises_a_rule_based_reward(base, tmp_path, align):
    root, _, _ = base
    result = train_ppo(_cfg(root, tmp_path / "run", steps=48, **align), progress=False)
    assert result.info["skipped_rollouts"] == 0 and result.info["rollouts"] >= 4
    assert result.info["reward_last"] > result.info["reward_first"] + 0.1, result
    assert result.final["val_kl"] > 0


def test_ppo_with_lora_starts_at_the_base_and_keeps_it(base, tmp_path, caplog):
    """The reference is the base itself, adapters disabled: the first rollout's KL is exactly 0;
    only adapters and the value head train, and the saved model is the base + merged adapters."""
    root, _, _ = base
    caplog.set_level(logging.INFO)
    cfg = _cfg(root, tmp_path / "run", steps=8)
    cfg = dataclasses.replace(cfg, lora=LoRAConfig(rank=4, alpha=8, targets=("q", "v", "lm_head")))
    result = train_ppo(cfg, progress=False)
    assert re.search(r"rollout 0: reward [\d.]+ \| KL to reference 0\.000 \|", caplog.text)
    assert result.final["val_kl"] != 0
    assert result.info["lora"]["trainable"] < result.info["lora"]["total"] / 5
    base_model, tuned = load_model(root / "sft" / "model"), load_model(result.model_dir)
    changed = {
        k for k, v in tuned.state_dict().items() if not torch.equal(v, base_model.state_dict()[k])
    }
    assert changed == {f"blocks.{i}.attn.{n}.weight" for i in range(2) for n in "qv"} | {
        "lm_head.weight"
    }
    assert (tmp_path / "run" / "adapters.safetensors").is_file()


def test_policy_starts_at_the_reference_and_the_value_loss_leaves_it_alone(base):
    root, _, tok = base
    policy = PolicyValue(load_model(root / "sft" / "model"))
    ref = reference_logits(policy.body, load_model(root / "sft" / "model"))
    x = torch.tensor([prompt_ids(tok, [{"role": "user", "content": "写诗"}])])
    logits, values = policy(x)
    assert torch.equal(logits, ref(x)) and torch.equal(values, torch.zeros_like(values))
    values.sum().backward()  # the value head reads detached hidden states
    assert (
        all(p.grad is None for p in policy.body.parameters())
        and policy.value_head.weight.grad is not None
    )


def test_a_raising_reward_skips_its_rollout_and_training_goes_on(base, tmp_path, caplog):
    root, _, _ = base
    cfg = _cfg(root, tmp_path / "run", reward=f"{root / 'rewards.py'}:flaky")
    result = train_ppo(cfg, progress=False)
    assert result.info["skipped_rollouts"] == 2 and result.last["step"] == 24
    assert (
        "rollout 0 skipped: the reward function failed (RuntimeError: scoring service unavailable)"
        in caplog.text
    )
    with pytest.raises(
        ValueError, match="failed on 10 rollouts in a row; the last error: KeyError"
    ):
        train_ppo(
            _cfg(root, tmp_path / "run2", reward=f"{root / 'rewards.py'}:broken"), progress=False
        )


@pytest.mark.parametrize(
    "reward, match",
    [
        ("nowhere.py:fn", "cannot import"),
        ("zerolm.align.losses:nope", "has no callable 'nope'"),
        ("gibberish", "give 'poem-form', a reward model directory"),
    ],
)
def test_reward_spec_errors(base, reward, match):
    root, _, _ = base
    with pytest.raises(ValueError, match=match):
        load_reward(reward, root / "sft" / "model")


def test_reward_model_or_reference_with_another_tokenizer_is_a_clear_error(
    base, tmp_path, tiny_model, tiny_tokenizer
):
    root, _, _ = base
    other = tiny_tokenizer("char", TEXT)
    save_model(tiny_model("llama", other.vocab_size, d_model=48), tmp_path / "other", other)
    (tmp_path / "other" / "reward_head.safetensors").write_bytes(b"")
    with pytest.raises(
        ValueError, match="the reward model .* has a different tokenizer than the policy"
    ):
        load_reward(str(tmp_path / "other"), root / "sft" / "model")
    with pytest.raises(ValueError, match="the reference model .* has a different tokenizer"):
        train_ppo(_cfg(root, tmp_path / "x", reference=str(tmp_path / "other")), progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="'poem-form' scores poem requests"):
        train_ppo(_cfg(root, tmp_path / "x", reward="poem-form"), progress=False)


def test_cli_ppo_and_dpo_run_and_report(base, tmp_path, capsys):
    from zerolm.cli import main

    root, _, _ = base
    common = [
        "--model",
        str(root / "sft" / "model"),
        "--quiet",
        "--train.steps=4",
        "--train.batch_size=8",
        "--train.precision=fp32",
        "--train.warmup_steps=1",
    ]
    assert (
        main(
            [
                "ppo",
                *common,
                "--out",
                str(tmp_path / "ppo"),
                f"--align.data={root / 'prompts.jsonl'}",
                f"--align.reward={root / 'rewards.py'}:ascii_share",
                "--align.rollout_prompts=8",
                "--align.max_new_tokens=8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "rollouts (0 skipped): mean reward" in out
        and f"model saved to {tmp_path / 'ppo' / 'model'}" in out
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {"prompt": f"问题{i}", "chosen": "谢谢，很高兴帮你。", "rejected": "走开"},
                ensure_ascii=False,
            )
            + "\n"
            for i in range(20)
        )
    )
    assert (
        main(
            [
                "dpo",
                *common,
                "--out",
                str(tmp_path / "dpo"),
                f"--align.data={pairs}",
                "--align.val_fraction=0.3",
            ]
        )
        == 0
    )
    assert "held-out pairs (" in capsys.readouterr().out
    assert (
        main(
            [
                "ppo",
                *common,
                "--out",
                str(tmp_path / "bad"),
                f"--align.data={pairs}",
                "--align.reward=nope",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "align.reward='nope'" in err


def test_ppo_resumes_from_its_checkpoint(base, tmp_path, caplog):
    root, _, _ = base
    cfg = _cfg(root, tmp_path / "run", steps=8, target_kl=0)  # no early stop: 4 steps per rollout
    first = train_ppo(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ckpt_every=4)), progress=False
    )
    assert (
        first.last["step"] == 8 and first.info["rollouts"] == 2
    )  # 16 replies = 2 minibatches x 2 epochs per rollout
    cfg = _cfg(root, tmp_path / "run", steps=12, target_kl=0)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_ppo(cfg, progress=False)
    caplog.clear()
    caplog.set_level(logging.INFO)
    again = train_ppo(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True)), progress=False
    )
    assert (
        again.last["step"] == 12 and "(step 8)" in caplog.text and "rollout 2:" in caplog.text
    )  # the next one


def test_a_reward_model_scores_the_conversation_it_was_trained_on(base, tmp_path):
    """align.reward=DIR: each reply is scored by the reward model on the chat rendering of the
    prompt + reply, the layout `zerolm reward` trains on (reward read at the last token)."""
    from zerolm.align.reward import RewardModel
    from zerolm.tokenizer.chat import render

    root, model, tok = base
    rm = RewardModel(model)
    torch.nn.init.normal_(rm.head.weight, generator=torch.Generator().manual_seed(0))
    rm.save(tmp_path / "rm", tok)
    scores = load_reward(str(tmp_path / "rm"), root / "sft" / "model")
    prompts = [
        {"messages": [{"role": "user", "content": "写诗"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    replies = ["床前明月光", "Thank you very much"]
    got = scores(prompts, replies)
    with torch.no_grad():
        want = [
            rm(torch.tensor([ids]), torch.tensor([len(ids)])).item()
            for ids in (
                render(tok, [*p["messages"], {"role": "assistant", "content": r}])[0]
                for p, r in zip(prompts, replies)
            )
        ]
    assert got == pytest.approx(want, abs=1e-5) and got[0] != got[1]
