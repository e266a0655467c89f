"""One sequence's fault ends that sequence alone (issue 18): bad jobs are refused at submit, a row
whose sampling raises or whose logits are not finite ends by itself, a failed model pass leaves the
scheduler consistent, and the attention inspector runs beside the scheduler on the same model."""

import math
import threading
import time

import pytest
import torch

from zerolm.config import ModelConfig
from zerolm.infer.sampling import SamplingParams
from zerolm.inspect.attention import attention_weights
from zerolm.model import build_model, load_model
from zerolm.model.layers import apply_rope
from zerolm.serve.jobs import Job
from zerolm.serve.scheduler import Scheduler
from zerolm.transforms.layout import decode_layout

GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9)


class Rec:
    """One job's events: token ids, then its end ("done", reason) or ("error", message)."""

    def __init__(self, fail_at: int | None = None):
        self.tokens, self.end, self.fail_at = [], None, fail_at
        self.finished = threading.Event()

    def __call__(self, kind, value):
        if kind == "token":
            self.tokens.append(value.id)
            if len(self.tokens) == self.fail_at:
                raise RuntimeError("the client's callback broke")  # e.g. a closed event loop
        else:
            self.end = (kind, value)
            self.finished.set()


def spec(i: int, n: int = 150) -> dict:
    """Healthy jobs: different prompts and lengths, greedy and seeded sampling."""
    return dict(
        prompt=[1, 20 + i, 30 + 2 * i, 40 + i][: 2 + i % 3],
        max_new_tokens=n + 7 * i,
        sampling=GREEDY if i % 2 else SAMPLED,
        seed=100 + i,
    )


def start(sched, specs) -> list[Rec]:
    """Submit the jobs at once (so they are admitted together); their recorders."""
    recs = [Rec() for _ in specs]
    sched.submit([Job(**s, emit=r) for s, r in zip(specs, recs)])
    return recs


def finish(recs, timeout=60.0):
    for r in recs:
        assert r.finished.wait(timeout), "a job never ended"
    return [(r.tokens, r.end) for r in recs]


def solo(sched, specs):
    return [finish(start(sched, [s]))[0] for s in specs]


def running_all(recs, timeout=30.0):
    t0 = time.time()
    while not all(r.tokens for r in recs):
        assert time.time() - t0 < timeout
        time.sleep(0.002)


@pytest.fixture(scope="module")
def model(model_dir):
    return decode_layout(load_model(model_dir))  # as the server loads it


@pytest.fixture
def sched(model, request):
    """An eager scheduler, or (parametrized indirectly with "compiled") one that decodes all 8
    slots in the compiled step."""
    compiled = getattr(request, "param", "eager") == "compiled"
    if compiled:
        request.getfixturevalue("program_cache")
    s = Scheduler(model, max_batch=8, max_queue=32, compile=compiled)
    assert s.engine.compiled == compiled
    yield s
    s.close()


BOTH = pytest.mark.parametrize(
    "sched", ["eager", pytest.param("compiled", marks=pytest.mark.slow)], indirect=True
)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(seed=2**64), "seed"),
        (dict(seed=-1), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(prompt=[1, 320]), "prompt"),
        (dict(prompt=[1, -1]), "prompt"),
        (dict(prompt=[1, 2.0]), "prompt"),
        (dict(prompt=[]), "empty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (
            dict(prompt=[1] * 1100, max_new_tokens=-76),
            "max_new_tokens",
        ),  # a too-long prompt + negative room
        (dict(prompt=[1] * 1024, max_new_tokens=1), "window"),
        (dict(logprobs=-1), "logprobs"),
        (dict(sampling=SamplingParams(temperature=math.nan)), "temperature"),
        (dict(sampling=SamplingParams(repetition_penalty=math.inf)), "repetition_penalty"),
    ],
)
def test_a_job_that_would_fail_later_is_refused_at_submit(sched, change, field):
    with pytest.raises(ValueError, match=field):
        sched.submit([Job(**{**spec(0, 4), **change})])
    assert sched.load() == {"waiting": 0, "running": 0, "slots": 8}


@BOTH
def test_the_issues_poisons_leave_running_streams_intact(sched):
    healthy = [spec(i) for i in range(6)]
    want = solo(sched, healthy)
    recs = start(sched, healthy)
    running_all(recs)
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed"):
            sched.submit([Job(prompt=[1, 5], max_new_tokens=8, seed=seed)])
    with pytest.raises(
        ValueError, match="max_new_tokens"
    ):  # the "KV cache full" prompt never reaches prefill
        sched.submit([Job(prompt=[1] * 1100, max_new_tokens=-76)])
    # tiny temperatures are greedy; tiny penalties and top_p sample without NaN
    extreme = [
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=1e-300),
        SamplingParams(repetition_penalty=1e-300),
        SamplingParams(repetition_penalty=5e-324),
        SamplingParams(top_p=1e-30),
    ]
    odd = start(
        sched, [dict(prompt=[1, 5, 5], max_new_tokens=8, sampling=p, seed=3) for p in extreme]
    )
    got = finish(recs + odd)
    assert got[:6] == want
    assert all(end == ("done", "length") and len(toks) == 8 for toks, end in got[6:])
    assert (
        got[6][0]
        == got[7][0]
        == solo(sched, [dict(prompt=[1, 5, 5], max_new_tokens=8, sampling=GREEDY)])[0][0]
    )


@BOTH
def test_a_row_whose_sampling_raises_ends_alone(sched):
    healthy = [spec(i) for i in range(6)]
    want = solo(sched, healthy)
    recs = start(sched, healthy)
    running_all(recs)
    bad, broken = Rec(), Rec(fail_at=3)
    with (
        sched._cv
    ):  # the scheduler cannot admit it before its sampling is broken (a bug past validation)
        job = Job(prompt=[1, 7], max_new_tokens=50, sampling=SAMPLED, seed=1, emit=bad)
        sched.submit([job, Job(prompt=[1, 8], max_new_tokens=50, emit=broken)])
        job.sampling = SamplingParams(temperature=math.nan)
    assert bad.finished.wait(30) and broken.finished.wait(30)
    at_error = [len(r.tokens) for r in recs]
    assert bad.tokens == [] and bad.end[0] == "error" and "temperature" in bad.end[1]
    assert len(broken.tokens) == 3 and broken.end == (
        "error",
        "generation failed: RuntimeError: the client's callback broke",
    )
    assert finish(recs) == want
    assert any(n < len(w[0]) for n, w in zip(at_error, want))  # the others were still running
    assert finish(start(sched, healthy[:3])) == want[:3]  # slots and cache still agree
    assert sched.health()["ok"]  # client-side or sampling faults do not make the model unhealthy


@BOTH
def test_a_failed_model_pass_fails_its_rows_and_the_scheduler_carries_on(sched):
    healthy = [spec(i, 120) for i in range(4)]
    want = solo(sched, healthy)
    recs = start(sched, healthy)
    running_all(recs)
    bad = Rec()
    with sched._cv:  # an id past validation: its prefill fails, the running rows do not take part
        job = Job(prompt=[1, 7], max_new_tokens=5, emit=bad)
        sched.submit([job])
        job.prompt = [1, 10**6]
    assert bad.finished.wait(30) and bad.end[0] == "error" and "prefill" in bad.end[1]
    assert finish(recs) == want  # a slot moved wrongly would have changed their tokens
    # a failing decode pass (e.g. out of memory) ends the rows in it; the next requests are
    # unaffected
    decode, calls = sched.engine.decode, []

    def fails_once(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return decode(*a, **kw)

    sched.engine.decode = fails_once
    got = finish(start(sched, healthy))
    assert all(
        end
        == ("error", "generation failed in the model's decode pass: RuntimeError: out of memory")
        for _, end in got
    )
    assert sched.load()["running"] == 0
    assert finish(start(sched, healthy)) == want
    h = sched.health()
    assert h["ok"] and h["failed_passes"] == 2 and "out of memory" in h["last_error"]


def tiny_llama():
    return build_model(
        ModelConfig(
            preset="llama", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64
        ),
        vocab_size=50,
        seed=0,
    ).eval()


SHORT = [
    dict(prompt=[1, 2 + i], max_new_tokens=20 + i, sampling=GREEDY if i % 2 else SAMPLED, seed=i)
    for i in range(3)
]


def test_non_finite_logits_end_that_row_alone_and_mark_the_model_unhealthy():
    model = (
        tiny_llama()
    )  # finite weights, whose logits are NaN from position 39 on (a broken rope table)
    model.rope_cos[39:] = math.nan
    sched = Scheduler(model, max_batch=4)
    try:
        want = solo(sched, SHORT)  # they never reach position 39
        assert sched.health() == {
            "ok": True,
            "reason": None,
            "nonfinite_logits": 0,
            "failed_rows": 0,
            "failed_passes": 0,
            "last_error": None,
        }
        recs = start(sched, SHORT)
        running_all(recs)
        bad = Rec()
        sched.submit([Job(prompt=[1] * 40, max_new_tokens=10, emit=bad)])
        assert bad.finished.wait(30)
        assert bad.tokens == [] and bad.end == (
            "error",
            "the model produced non-finite logits (NaN or inf) for this "
            "request: its weights are not finite or this input "
            "overflows them",
        )
        assert finish(recs) == want
        h = sched.health()
        assert not h["ok"] and "non-finite logits" in h["reason"] and h["nonfinite_logits"] == 1
    finally:
        sched.close()


def test_a_nan_row_leaves_nothing_in_its_cache_slot_and_nan_weights_are_unhealthy_from_the_start():
    model = tiny_llama()
    with torch.no_grad():
        model.tok_emb.weight[49] = math.nan  # rows that see token 49 give NaN logits
    sched = Scheduler(model, max_batch=4)
    try:
        h = sched.health()
        assert not h["ok"] and "tok_emb.weight" in h["reason"] and h["nonfinite_logits"] == 0
        longer = dict(prompt=list(range(1, 12)), max_new_tokens=20, sampling=GREEDY)
        want = solo(sched, [*SHORT, longer])
        assert all(49 not in toks for toks, _ in want)
        recs = start(sched, SHORT)
        running_all(recs)
        bad = Rec()
        sched.submit(
            [Job(prompt=[1, 49, *range(3, 12)], max_new_tokens=10, emit=bad)]
        )  # into slot 3
        assert bad.finished.wait(30) and bad.end[0] == "error" and "non-finite logits" in bad.end[1]
        assert finish(recs) == want[:3]
        # slot 3 again, with a shorter prompt beside a longer one: the NaN keys and values left
        # there
        # sit in its masked positions, which must not leak in
        assert finish(start(sched, [longer, *SHORT[1:], SHORT[0]])) == [
            want[3],
            *want[1:3],
            want[0],
        ]
        assert sched.health()["nonfinite_logits"] == 1
    finally:
        sched.close()


def test_a_nan_checkpoint_gives_each_request_an_error():
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    sched = Scheduler(model, max_batch=2)
    try:
        assert not sched.health()["ok"]
        got = finish(start(sched, SHORT))
        assert all(
            toks == [] and end[0] == "error" and "non-finite logits" in end[1] for toks, end in got
        )
        assert sched.health()["nonfinite_logits"] == 3
    finally:
        sched.close()
    assert not sched.health()["ok"] and "not running" in sched.health()["reason"]


def hooked_attention_weights(model, ids, layer):
    """The old implementation (a forward hook on the model), as the reference on an idle model."""
    attn, seen = model.blocks[layer].attn, {}
    handle = attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=a[0], rope=kw.get("rope")), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            model(torch.tensor([ids]))
    finally:
        handle.remove()
    x, T = seen["x"].float(), len(ids)
    with torch.inference_mode():
        w = attn.state_dict()  # the split q, k weights, also of a decode-laid-out model
        q = (x @ w["q.weight"].T).view(1, T, attn.h, attn.dh).transpose(1, 2)
        k = (x @ w["k.weight"].T).view(1, T, attn.kv, attn.dh).transpose(1, 2)
        q, k = apply_rope(q, *seen["rope"]), apply_rope(k, *seen["rope"])
        k = k.repeat_interleave(attn.h // attn.kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.dh)
        return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf).softmax(
            -1
        )[0]


def test_the_inspector_runs_beside_the_scheduler_on_the_same_model(sched, model):
    ids = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
    idle = [hooked_attention_weights(model, ids, layer) for layer in (0, 1)]
    assert all(
        torch.equal(attention_weights(model, ids, layer), w) for layer, w in zip((0, 1), idle)
    )
    healthy = [spec(i, 200) for i in range(4)]
    want = solo(sched, healthy)
    recs = start(sched, healthy)
    running_all(recs)
    results, errors = [], []

    def inspect():
        while not all(r.finished.is_set() for r in recs) or len(results) < 10:
            try:
                got = [attention_weights(model, ids, layer) for layer in (0, 1)]
                results.append(all(torch.equal(g, w) for g, w in zip(got, idle)))
            except (
                Exception
            ) as e:  # the old hook-based code: shape errors while the scheduler decodes
                errors.append(repr(e))

    threads = [threading.Thread(target=inspect) for _ in range(2)]
    for t in threads:
        t.start()
    got = finish(recs)
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) >= 20 and all(results)
    assert got == want
    with pytest.raises(ValueError, match="token ids"):
        attention_weights(model, [1, 320], 0)
