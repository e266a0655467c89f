"""tasks/poems/instruct.py: form adherence is the share of requests whose greedy answer the form
judge accepts, the same whether answered in batches or one by one; compare_models measures each
model on the same requests, with KL to a reference (0 to itself)."""

import pytest
import torch
import torch.nn.functional as F

from zerolm.infer.chat import chat_request, replies
from zerolm.infer.sampling import SamplingParams
from zerolm.model import save_model
from zerolm.tasks.poems.form import judge
from zerolm.tasks.poems.instruct import compare_models, form_adherence
from zerolm.tokenizer.chat import render


def request(ask: str, answer: str, kind: str, lines: int, chars: int) -> dict:
    """A poem request as zerolm.data.poems makes them: the reference answer is the last message."""
    messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "kind": kind, "form": {"lines": lines, "chars": chars}}


JINGYESI = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
DENGGUANQUELOU = "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。"
LEARNED = [  # the model below learns to answer these two
    request("以《静夜思》为题写一首五言绝句", JINGYESI, "title", 4, 5),
    request("写一首王之涣风格的五言绝句", DENGGUANQUELOU, "author", 4, 5),
]
UNSEEN = [
    request(
        "续写这首五言绝句：春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。", "continue", 2, 5
    ),
    request("以《登鹳雀楼》为题写一首七言绝句", DENGGUANQUELOU, "title", 4, 7),
]
REQUESTS = [LEARNED[0], UNSEEN[0], LEARNED[1], UNSEEN[1]]
STEPS = 80  # 30 are too few to learn both answers, 60 enough


@pytest.fixture(scope="module")
def poet(tiny_model, tiny_tokenizer):
    """A tiny llama trained until it answers LEARNED word for word (greedy)."""
    text = [m["content"] for r in REQUESTS for m in r["messages"]]
    tok = tiny_tokenizer("char", text, vocab_size=400)
    model = tiny_model("llama", vocab_size=tok.vocab_size, d_model=64, max_seq_len=96)
    rows = [render(tok, r["messages"])[:2] for r in LEARNED]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])  # (B, T + 1)
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rows])[:, 1:].float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        loss = F.cross_entropy(model(ids[:, :-1]).transpose(1, 2), ids[:, 1:], reduction="none")
        opt.zero_grad()
        ((loss * mask).sum() / mask.sum()).backward()
        opt.step()
    return model.eval(), tok


def test_form_adherence_is_the_judged_share_of_greedy_answers(poet):
    model, tok = poet
    got = form_adherence(model, tok, REQUESTS, batch_size=3)  # a full batch and a partial one
    greedy = chat_request(tok, 96, SamplingParams(temperature=0.0), seed=0)
    answers = [replies(model, tok, [r["messages"][:-1]], greedy)[0] for r in REQUESTS]
    oks = [
        judge(a, r["form"]["lines"], r["form"]["chars"])["ok"] for r, a in zip(REQUESTS, answers)
    ]
    assert answers[0] == JINGYESI and answers[2] == DENGGUANQUELOU  # learned: in form
    assert not oks[3]  # the 7-character request answered with 5-character lines
    assert got["n"] == 4 and got["form_ok"] == sum(oks) / 4
    by_kind = {}
    for r, ok in zip(REQUESTS, oks):
        by_kind.setdefault(r["kind"], []).append(ok)
    assert got["by_kind"] == {
        k: {"n": len(v), "form_ok": sum(v) / len(v)} for k, v in sorted(by_kind.items())
    }
    assert got["examples"] == [
        {"request": r["messages"][0]["content"], "answer": a} for r, a in zip(REQUESTS[:3], answers)
    ]
    assert form_adherence(model, tok, [])["n"] == 0


def test_compare_models_on_the_same_requests_with_kl_to_the_reference(poet, tiny_model, tmp_path):
    model, tok = poet
    poet_dir, other_dir = tmp_path / "poet", tmp_path / "other"
    save_model(model, poet_dir, tok)
    other = tiny_model("llama", vocab_size=tok.vocab_size, d_model=64, max_seq_len=96, seed=1)
    save_model(other, other_dir, tok)
    said = []
    got = compare_models([poet_dir, other_dir], REQUESTS, reference=str(poet_dir), say=said.append)
    assert got[str(poet_dir)]["form_ok"] == form_adherence(model, tok, REQUESTS)["form_ok"] >= 0.5
    assert got[str(poet_dir)]["kl"] == pytest.approx(0.0, abs=1e-5)  # KL of a model to itself
    assert got[str(other_dir)]["kl"] > 1.0  # a random model's replies are unlikely under the poet
    assert (
        len(said) == 2 and said[0].startswith(f"{poet_dir}: ") and "KL to the reference" in said[1]
    )
    sampled = [
        compare_models([other_dir], REQUESTS, sampling=SamplingParams(temperature=1.0), seed=s)
        for s in (0, 0)
    ]
    assert sampled[0] == sampled[1]  # seeded sampling: the same answers again
