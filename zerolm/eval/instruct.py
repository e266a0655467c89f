"""Instruction following, measured: the share of held-out poem requests (zerolm.data.poems)
answered in the requested form, judged by the rule-based judge (zerolm.eval.poem_form)."""
from __future__ import annotations

from collections import defaultdict

from zerolm.eval.poem_form import judge
from zerolm.infer.chat import chat_request, replies
from zerolm.infer.sampling import SamplingParams


def form_adherence(model, tok, requests: list[dict], *, max_new_tokens: int = 96,
                   sampling: SamplingParams | None = None, seed: int | None = 0, batch_size: int = 16) -> dict:
    """Generate one answer per request (its messages without the reference answer) and judge its
    form. Greedy by default, so the figure is reproducible; answers may use all the room the
    window leaves after the prompt, up to max_new_tokens."""
    req = chat_request(tok, max_new_tokens, sampling or SamplingParams(temperature=0.0), seed)
    answers: list[str] = []
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        answers += replies(model, tok, [r["messages"][:-1] for r in chunk], req)
    ok_by_kind = defaultdict(list)
    for r, a in zip(requests, answers):
        ok_by_kind[r["kind"]].append(judge(a, r["form"]["lines"], r["form"]["chars"])["ok"])
    oks = [ok for v in ok_by_kind.values() for ok in v]
    return {"n": len(oks), "form_ok": sum(oks) / max(len(oks), 1),
            "by_kind": {k: {"n": len(v), "form_ok": sum(v) / len(v)} for k, v in sorted(ok_by_kind.items())},
            "examples": [{"request": r["messages"][-2]["content"], "answer": a} for r, a in zip(requests[:3], answers)]}
