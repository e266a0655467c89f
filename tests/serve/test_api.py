"""The real server on 127.0.0.1 driven by the official `openai` client, and raw HTTP for errors."""

import http.client
import json

import pytest
from openai import OpenAI

from zerolm.serve.limits import Limits

API_KEY = "sk-test-123"  # as in conftest.py
LIMITS = Limits(max_tokens=48, max_n=4, max_messages=8, max_body_bytes=20_000)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "床前明月光"}]


def raw(live, method, path, body=None, headers=None, key=API_KEY):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    hdrs = {
        "Content-Type": "application/json",
        **({"Authorization": f"Bearer {key}"} if key else {}),
        **(headers or {}),
    }
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=hdrs)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return r.status, dict(r.getheaders()), text


def test_models_and_health(live, client):
    assert live.server.limits == LIMITS
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].owned_by == "zerolm"
    status, _, body = raw(live, "GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["slots"] == 8


def test_chat_non_streaming_and_streaming_agree(client):
    kw = dict(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage  # the usage chunk comes last
    u = full.usage
    assert u.completion_tokens <= 12 and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_prompt_token_count_is_the_chat_template_length(live, client, model_dir):
    from zerolm.tokenizer import Tokenizer
    from zerolm.tokenizer.chat import prompt_ids

    tok = Tokenizer.load(model_dir)
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(prompt_ids(tok, CHAT))
    c = client.completions.create(model="tiny", prompt="Hello there", max_tokens=3, temperature=0)
    assert c.usage.prompt_tokens == 1 + len(tok.encode("Hello there"))  # <|eos|> + the text


def test_completion_streaming_n_and_seed(client):
    kw = dict(model="tiny", prompt="白日依山尽", max_tokens=10, temperature=1.0, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same text
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # choice i draws with seed + i
    other = client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    assert a.usage.completion_tokens <= 30
    texts = ["", "", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in a.choices]


def test_stop_strings_cut_the_text(client):
    kw = dict(model="tiny", prompt="Hello", max_tokens=30, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    plain = [ch for ch in free if ch.isalnum()]
    assert len(plain) >= 3, free
    stop = plain[2]  # a character the greedy text contains
    cut = free[: free.index(stop)]
    got = client.completions.create(**kw, stop=[stop, "never-appears"]).choices[0]
    assert got.text == cut and got.finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(**kw, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == cut


def test_logprobs_are_the_model_distribution(client, model_dir):
    import torch

    from zerolm.model import load_model
    from zerolm.tokenizer import Tokenizer
    from zerolm.tokenizer.chat import prompt_ids

    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = r.choices[0].logprobs.content
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    ids = prompt_ids(tok, CHAT)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
    top = lp.topk(3)
    assert entries[0].logprob == pytest.approx(
        top.values[0].item(), abs=1e-4
    )  # greedy: the top token
    assert [t.logprob for t in entries[0].top_logprobs] == pytest.approx(
        top.values.tolist(), abs=1e-4
    )
    assert bytes(entries[0].bytes) == tok.token_bytes[int(top.indices[0])]


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        ({"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
        ({"messages": CHAT, "temperature": 5}, 400, "temperature"),
        ({"messages": CHAT, "n": LIMITS.max_n + 1}, 400, "n"),
        ({"messages": CHAT, "max_tokens": LIMITS.max_tokens + 1}, 400, "max_tokens"),
        ({"messages": CHAT * 5}, 400, "messages"),  # 10 messages > 8 allowed (and system not first)
        (
            {"messages": [{"role": "user", "content": "月" * 1100}]},
            400,
            "messages",
        ),  # over the window
        ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "x" * 30_000}]}, 413, None),  # body over 20 kB
    ],
)
def test_bad_requests_are_4xx_with_an_openai_error_and_the_server_keeps_serving(
    live, client, body, status, param
):
    got, _, err = raw(live, "POST", "/v1/chat/completions", body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["param"] == param
    assert client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=2
    ).choices  # still answers


def test_context_errors_name_the_fix(live, model_dir):
    from zerolm.tokenizer import Tokenizer

    # a prompt that fits the 1,023-token limit but not with 40 new tokens after it
    tok = Tokenizer.load(model_dir)
    k = next(k for k in range(1, 4000) if len(tok.completion_ids(["月" * k])[0]) > 1023 - 40)
    assert len(tok.completion_ids(["月" * k])[0]) <= 1023
    status, _, err = raw(live, "POST", "/v1/completions", {"prompt": "月" * k, "max_tokens": 40})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    assert "lower max_tokens" in err["error"]["message"]
    status, _, err = raw(live, "POST", "/v1/completions", {"prompt": ""})
    assert status == 400 and err["error"]["param"] == "prompt"
    status, _, err = raw(live, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in err


def test_api_key(live):
    for key in (None, "sk-wrong"):
        status, _, err = raw(live, "GET", "/v1/models", key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
    with pytest.raises(Exception, match="401"):
        OpenAI(base_url=live.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert raw(live, "GET", "/v1/models")[0] == 200


def test_metrics_are_prometheus_text(live, client):
    client.completions.create(model="tiny", prompt="Hi", max_tokens=3)
    status, headers, text = raw(live, "GET", "/metrics", key=None)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {
        ln.split(" ")[0]: float(ln.split(" ")[1])
        for ln in text.splitlines()
        if ln and not ln.startswith("#")
    }
    assert values["zerolm_requests_total"] >= 1 and values["zerolm_generated_tokens_total"] >= 3
    assert values["zerolm_time_to_first_token_seconds_count"] >= 1
    assert (
        values['zerolm_time_to_first_token_seconds_bucket{le="+Inf"}']
        == values["zerolm_time_to_first_token_seconds_count"]
    )
    for name in ("zerolm_queue_depth", "zerolm_running_sequences", "zerolm_tokens_per_second"):
        assert name in values


def test_openapi_document_describes_the_api(live):
    status, _, doc = raw(live, "GET", "/openapi.json", key=None)
    assert status == 200
    paths = doc["paths"]
    for path in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/inspect/attention"):
        assert path in paths
    chat = paths["/v1/chat/completions"]["post"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    schema = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "stop",
        "n",
        "seed",
        "logprobs",
        "top_logprobs",
        "stream",
        "stream_options",
    } <= set(schema)


def test_attention_endpoint(live, model_dir):
    status, _, body = raw(
        live, "POST", "/v1/inspect/attention", {"messages": CHAT, "layer": 1, "head": 2}
    )
    assert status == 200 and body["n_layers"] == 2 and body["n_heads"] == 4
    T = len(body["tokens"])
    w = body["weights"]
    assert len(w) == T and all(len(r) == T for r in w)
    for t, row in enumerate(w):
        assert sum(row) == pytest.approx(1.0, abs=1e-3) and all(
            x == 0 for x in row[t + 1 :]
        )  # causal rows
    assert raw(live, "POST", "/v1/inspect/attention", {"prompt": "x", "layer": 9})[0] == 400
    assert (
        b"".join(bytes(b) for b in body["token_bytes"]).decode() == "Be brief.床前明月光"
    )  # specials: no bytes


def test_attention_of_generated_tokens_lines_up_with_the_reply(live, client, model_dir):
    """The inspector's request: the conversation + the reply's tokens (as logprobs bytes) give the
    same ids as generation did, so row offset + i is generated token i."""
    from zerolm.tokenizer import Tokenizer
    from zerolm.tokenizer.chat import prompt_ids

    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=6, temperature=0, logprobs=True
    )
    entries = r.choices[0].logprobs.content
    status, _, body = raw(
        live,
        "POST",
        "/v1/inspect/attention",
        {"messages": CHAT, "continuation": [e.bytes for e in entries], "layer": 0, "head": 1},
    )
    assert status == 200
    assert body["offset"] == len(prompt_ids(Tokenizer.load(model_dir), CHAT))
    assert body["tokens"][body["offset"] :] == [e.token for e in entries]
    assert len(body["weights"]) == body["offset"] + len(entries)
    bad = raw(
        live,
        "POST",
        "/v1/inspect/attention",
        {"messages": CHAT, "continuation": [[0xFF, 0xFE, 0xFD, 0xFC]]},
    )
    assert bad[0] == 400 and bad[2]["error"]["param"] == "continuation"


@pytest.mark.slow
def test_zerolm_serve_command(model_dir):
    """`zerolm serve` as a user runs it: a process on 127.0.0.1 that answers, and stops on
    SIGTERM."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zerolm.cli",
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--api-key",
            "sk-cli",
            "--max-batch",
            "2",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli", max_retries=0)
        t0 = time.time()
        while True:
            try:
                models = client.models.list().data
                break
            except Exception:
                assert proc.poll() is None and time.time() - t0 < 60, (
                    proc.stdout.read() if proc.poll() is not None else ""
                )
                time.sleep(0.2)
        assert models[0].id == "tiny"
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "你好"}],
            max_tokens=4,
            temperature=0,
        )
        assert reply.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
        out = proc.stdout.read()
        assert code in (0, -15) and "Traceback" not in out, (
            out
        )  # uvicorn re-raises SIGTERM after a graceful stop
