"""Continuous batching through the real server: concurrent streams equal the same requests alone,
a client that goes away frees its slot at once, a full queue answers 503 with Retry-After."""

import asyncio
import http.client
import json
import socket
import time

import pytest
from openai import AsyncOpenAI

from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.model import load_model
from zerolm.serve.jobs import Job
from zerolm.serve.limits import Limits
from zerolm.serve.scheduler import Scheduler

API_KEY = "sk-test-123"  # as in conftest.py


def requests(n=32):
    """Mixed requests: different prompts and lengths, greedy and seeded sampling, chat and
    completion."""
    out = []
    for i in range(n):
        kw = {
            "max_tokens": 8 + (i * 5) % 25,
            "temperature": 0.0 if i % 2 else 1.0,
            "seed": 100 + i,
            "top_p": 0.9 if i % 4 == 0 else 1.0,
        }
        if i % 3:
            kw["messages"] = [{"role": "user", "content": "床前明月光" * (1 + i % 4) + str(i)}]
        else:
            kw["prompt"] = "Hello there " * (1 + i % 5) + str(i)
        out.append(kw)
    return out


async def one(client, kw):
    """Stream one request; return (text, finish_reason)."""
    kw = dict(kw, model="tiny", stream=True)
    if "messages" in kw:
        stream = await client.chat.completions.create(**kw)
        text, reason = "", None
        async for c in stream:
            text += c.choices[0].delta.content or ""
            reason = c.choices[0].finish_reason or reason
        return text, reason
    stream = await client.completions.create(**kw)
    text, reason = "", None
    async for c in stream:
        text += c.choices[0].text
        reason = c.choices[0].finish_reason or reason
    return text, reason


@pytest.mark.parametrize("mode", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_32_concurrent_streams_equal_each_request_alone(mode, request):
    live = request.getfixturevalue("live" if mode == "eager" else "live_compiled")

    async def main():
        client = AsyncOpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        reqs = requests()
        alone = [await one(client, kw) for kw in reqs]
        together = await asyncio.gather(*(one(client, kw) for kw in reqs))
        return alone, together

    before = live.server.scheduler.stats.steps
    alone, together = asyncio.run(main())
    assert together == alone
    assert all(reason in ("stop", "length") for _, reason in together)
    assert live.server.scheduler.load()["running"] == 0
    # batching really happened: far fewer decode steps than the tokens of the concurrent round
    assert (
        live.server.scheduler.stats.steps - before < sum(8 + (i * 5) % 25 for i in range(32)) * 1.6
    )


def pace(srv, seconds: float = 0.01) -> None:
    """Make every decode step of srv's scheduler last at least `seconds`: the tiny model decodes a
    1000-token stream in about a second, so a test about what happens while a stream runs would
    otherwise race the stream's end (a busy test machine pauses the client for as long)."""
    engine = srv.server.scheduler.engine
    decode = engine.decode

    def paced(*args, **kwargs):
        time.sleep(seconds)
        return decode(*args, **kwargs)

    engine.decode = paced


def test_a_client_that_disconnects_frees_its_slot_at_once(launch):
    srv = launch(max_batch=2, max_queue=4)
    pace(srv)
    srv.server.limits = Limits(max_tokens=1000)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(
            {"prompt": "Hello", "max_tokens": 1000, "stream": True, "temperature": 1.0, "seed": 0}
        ),  # seeded: an unseeded draw can end the stream at a stop token within 3 chunks
        {"Content-Type": "application/json"},
    )
    r = conn.getresponse()
    assert r.status == 200
    for _ in range(3):
        assert r.readline().startswith(b"data: ")  # a few chunks arrive
        r.readline()
    assert srv.server.scheduler.load()["running"] == 1
    conn.sock.shutdown(
        socket.SHUT_RDWR
    )  # the client goes away mid-stream (close() alone leaves the
    # connection open while the response's file object still refers to the socket)
    conn.sock.close()
    t0 = time.perf_counter()
    while srv.server.scheduler.load()["running"]:
        assert time.perf_counter() - t0 < 2.0, (
            "slot not freed"
        )  # paced, the stream would last >= 10 s
        time.sleep(0.01)
    assert srv.server.scheduler.stats.tokens < 1000  # cut short, not run to max_tokens


def test_a_full_queue_is_503_with_retry_after(launch):
    srv = launch(max_batch=1, max_queue=1)
    pace(srv)
    srv.server.limits = Limits(max_tokens=1000)
    body, headers = (
        json.dumps({"prompt": "Hi", "max_tokens": 900, "stream": True}),
        {"Content-Type": "application/json"},
    )
    conns = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30) for _ in range(4)]
    conns[0].request("POST", "/v1/completions", body, headers)
    first = conns[0].getresponse()
    first.fp.readline()  # its first event: it runs (no longer queued), for ~900 tokens
    for c in conns[
        1:
    ]:  # back to back, well within that time: one waits, the rest find the queue full
        c.request("POST", "/v1/completions", body, headers)
    statuses = [(first.status, first.getheader("Retry-After"))]
    for c in conns[1:]:
        r = c.getresponse()
        statuses.append((r.status, r.getheader("Retry-After")))
        if r.status != 200:
            assert json.loads(r.read())["error"]["code"] == "server_busy"
    assert statuses[0] == (
        200,
        None,
    )  # the three arrive together: whichever the server takes first waits
    assert sorted(statuses[1:], key=str) == [(200, None), (503, "1"), (503, "1")]
    for c in conns:
        c.close()


def test_scheduler_rows_joining_and_leaving_mid_flight_equal_the_engine_alone(model_dir):
    """Below HTTP: sequences that arrive while others run, and finish at different steps (their
    slots then take the last sequence's cache), decode exactly as Engine.generate alone (greedy)."""
    model = load_model(model_dir)
    prompts = [
        [1, 20, 21, 22],
        [1, 30],
        [1, 40, 41, 42, 43, 44, 45],
        [1, 50, 51],
        [1, 60, 61, 62, 63],
        [1, 70],
    ]
    lengths = [12, 3, 9, 5, 14, 7]
    greedy = SamplingParams(temperature=0)
    want = [
        Engine(model).generate([p], GenerateRequest(max_new_tokens=n, sampling=greedy))[0]
        for p, n in zip(prompts, lengths)
    ]
    sched = Scheduler(model, max_batch=3, max_queue=8)
    got = {i: [] for i in range(len(prompts))}
    done = {}
    try:
        for i, (p, n) in enumerate(zip(prompts, lengths)):

            def emit(kind, value, i=i):
                if kind == "token":
                    got[i].append(value.id)
                else:
                    done[i] = value

            sched.submit([Job(prompt=p, max_new_tokens=n, sampling=greedy, emit=emit)])
            time.sleep(0.002 * i)  # arrive at different steps
        t0 = time.time()
        while len(done) < len(prompts):
            assert time.time() - t0 < 30
            time.sleep(0.01)
    finally:
        sched.close()
    assert [got[i] for i in range(len(prompts))] == want
    assert set(done.values()) == {"length"}


def run_jobs(sched, specs, stagger=0.002):
    """Submit the jobs one by one, `stagger` seconds apart (they join at different steps, and wait
    for slots); each one's (token ids, logprobs, end)."""
    got = [([], [], None) for _ in specs]
    ended = [False] * len(specs)
    for i, spec in enumerate(specs):

        def emit(kind, value, i=i):
            if kind == "token":
                got[i][0].append(value.id)
                got[i][1].append(value.logprob)
            else:
                got[i] = (*got[i][:2], (kind, value))
                ended[i] = True

        sched.submit([Job(**spec, emit=emit)])
        time.sleep(stagger)
    t0 = time.time()
    while not all(ended):
        assert time.time() - t0 < 120, "a job never ended"
        time.sleep(0.01)
    return got


@pytest.mark.slow  # a compile of the 8-slot step (20-60 s), shared with the compiled server's tests
def test_a_compiled_scheduler_gives_the_eager_tokens(model_dir, program_cache):
    """Scheduler(compile=True) decodes all 8 slots in one compiled step, empty slots masked: seeded
    and greedy jobs (penalties, stop ids, logprobs) that join, wait and leave at different steps
    draw the very tokens the eager scheduler draws, with the same log-probabilities."""
    from zerolm.transforms.layout import decode_layout

    model = decode_layout(load_model(model_dir))  # as the server loads it
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.3),
        SamplingParams(temperature=0, frequency_penalty=0.5),
    ]
    specs = [
        dict(
            prompt=[1, 20 + i, 30 + 2 * i, 40 + i, 50][: 1 + i % 5],
            max_new_tokens=10 + 7 * (i % 6),
            sampling=params[i % 4],
            seed=200 + i,
            logprobs=1 if i % 2 else None,
        )
        for i in range(14)
    ]
    results = []
    for compile in (False, False, True):
        sched = Scheduler(model, max_batch=8, max_queue=32, compile=compile)
        try:
            assert sched.engine.compiled == compile
            results.append(run_jobs(sched, specs))
        finally:
            sched.close()
        if not results[1:]:  # stop every third job at its 5th token of the free run
            for i in range(0, len(specs), 3):
                specs[i]["stop_token_ids"] = (results[0][i][0][4],)
    _, eager, compiled = results
    assert [(t, end) for t, _, end in compiled] == [(t, end) for t, _, end in eager]
    assert any(end == ("done", "stop") for _, _, end in eager)  # stop ids really hit
    for (_, lp_c, _), (_, lp_e, _) in zip(compiled, eager):
        assert [x is None for x in lp_c] == [x is None for x in lp_e]
        assert all(c is None or abs(c - e) < 1e-4 for c, e in zip(lp_c, lp_e))
