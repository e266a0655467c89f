"""Instruction following, measured: the share of held-out poem requests
(zerolm.tasks.poems.requests) answered in the requested form, judged by the rule-based judge
(zerolm.tasks.poems.form)."""

from __future__ import annotations

from collections import defaultdict

from zerolm.eval.perplexity import evaluate_lm
from zerolm.eval.replies import kl_to_reference
from zerolm.infer.chat import chat_request, replies
from zerolm.infer.sampling import SamplingParams
from zerolm.model import load_model
from zerolm.model.protocol import LanguageModel
from zerolm.tasks.poems.form import judge
from zerolm.tokenizer import Tokenizer, check_tokenizers


def form_adherence(
    model: LanguageModel,
    tok,
    requests: list[dict],
    *,
    max_new_tokens: int = 96,
    sampling: SamplingParams | None = None,
    seed: int | None = 0,
    batch_size: int = 16,
) -> dict:
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
    return {
        "n": len(oks),
        "form_ok": sum(oks) / max(len(oks), 1),
        "by_kind": {
            k: {"n": len(v), "form_ok": sum(v) / len(v)} for k, v in sorted(ok_by_kind.items())
        },
        "examples": [
            {"request": r["messages"][-2]["content"], "answer": a}
            for r, a in zip(requests[:3], answers)
        ],
    }


def compare_models(
    model_dirs,
    requests: list[dict],
    *,
    reference: str | None = None,
    shards: str | None = None,
    max_new_tokens: int = 96,
    sampling: SamplingParams | None = None,
    seed: int | None = 0,
    say=None,
) -> dict:
    """form_adherence of each model directory on the same requests, with the same sampling; with
    `reference`, each model's KL to it (zerolm.eval.replies.kl_to_reference: replies sampled at
    temperature 1); with `shards`, its validation bits per byte there. say(line) reports each."""
    ref = load_model(reference) if reference else None
    out = {}
    for m in model_dirs:
        model, tok = load_model(m), Tokenizer.load(m)
        r = out[str(m)] = form_adherence(
            model, tok, requests, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed
        )
        line = (
            f"{m}: {r['form_ok']:.1%} of {r['n']} held-out requests answered in the requested form"
        )
        if reference and ref is not None:  # ref is loaded exactly when reference is given
            check_tokenizers(m, reference, "reference model")
            r.update(
                kl_to_reference(
                    model,
                    ref,
                    tok,
                    [q["messages"][:-1] for q in requests],
                    max_new_tokens=max_new_tokens,
                    seed=seed or 0,
                )
            )
            line += f", KL to the reference {r['kl']:.2f} nats per reply"
        if shards:
            r["val_bpb"] = evaluate_lm(model, shards, tok.token_byte_lengths())["val_bpb"]
            line += f", validation {r['val_bpb']:.4f} bits per byte"
        if say:
            say(line)
    return out
