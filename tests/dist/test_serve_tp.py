"""`torchrun --nproc-per-node 2 -m zerolm serve --tp 2` against `zerolm serve` in one process, both
real HTTP servers on 127.0.0.1: the same answers (greedy, seeded sampling, chat, streams, a
concurrent burst), followers kept alive by the heartbeat past --dist.timeout, the inspector
refused, SIGTERM ending every rank cleanly, and a dead follower reported by /health."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from launch import ROOT, env, free_port, plain

from zerolm.config import ModelConfig
from zerolm.model import build_model, save_model

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def post(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def healthy(url: str, proc: subprocess.Popen, log) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.loads(r.read())["status"] == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("server did not start: " + log.read_text()[-3000:])


def answer(url: str, body: dict) -> str:
    status, text = post(
        url + ("/v1/chat/completions" if "messages" in body else "/v1/completions"), body
    )
    assert status == 200, text
    if body.get("stream"):
        events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
        return "".join(
            c.get("text") or c.get("delta", {}).get("content") or ""
            for ev in events
            for c in ev["choices"]
        )
    choice = json.loads(text)["choices"][0]
    return choice.get("text") or choice["message"]["content"]


def serve_args(tmp_path, tiny_tokenizer) -> list[str]:
    """`-m zerolm serve MODEL --max-batch 4` for a tiny llama with GQA saved under tmp_path."""
    tok = tiny_tokenizer()
    cfg = ModelConfig(
        preset="llama", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256
    )
    save_model(build_model(cfg, vocab_size=tok.vocab_size, seed=1), tmp_path / "m", tok)
    return ["-m", "zerolm", "serve", str(tmp_path / "m"), "--max-batch", "4"]


BODIES = [
    {"prompt": "Hello there", "max_tokens": 14, "temperature": 0},
    {"prompt": "床前明月光", "max_tokens": 9, "temperature": 0},
    {"prompt": "The quick", "max_tokens": 20, "temperature": 1.0, "seed": 3},
    {
        "messages": [{"role": "user", "content": "hi, who are you?"}],
        "max_tokens": 12,
        "temperature": 0,
    },
    {"prompt": "Once upon", "max_tokens": 11, "temperature": 0, "stream": True},
]


def test_serve_tp2_answers_as_one_process_and_every_rank_stops_on_sigterm(tmp_path, tiny_tokenizer):
    serve = serve_args(tmp_path, tiny_tokenizer)
    p1, p2 = free_port(), free_port()
    logs = tmp_path / "one.log", tmp_path / "tp.log"
    one = subprocess.Popen(
        [sys.executable, *serve, "--port", str(p1)],
        env=env(),
        cwd=ROOT,
        stdout=logs[0].open("w"),
        stderr=subprocess.STDOUT,
    )
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    run += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    tp = subprocess.Popen(
        [*run, *serve, "--port", str(p2), "--tp", "2", "--dist.timeout=6"],
        env=env(),
        cwd=ROOT,
        stdout=logs[1].open("w"),
        stderr=subprocess.STDOUT,
    )
    u1, u2 = f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}"
    try:
        healthy(u1, one, logs[0])
        healthy(u2, tp, logs[1])
        ref = [answer(u1, b) for b in BODIES]
        assert len(set(ref)) == len(ref) and all(len(a) > 3 for a in ref)
        assert [answer(u2, b) for b in BODIES] == ref

        got: dict[int, str] = {}  # all at once: sequences join, finish and move slots
        threads = [
            threading.Thread(target=lambda i=i: got.update({i: answer(u2, BODIES[i % 5])}))
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(8)] == [ref[i % 5] for i in range(8)]

        time.sleep(8)  # idle past --dist.timeout=6: the heartbeat keeps rank 1 waiting
        assert answer(u2, BODIES[0]) == ref[0]
        status, text = post(u2 + "/v1/inspect/attention", {"prompt": "hi", "layer": 0, "head": 0})
        assert status == 400 and json.loads(text)["error"]["code"] == "tensor_parallel"
    finally:
        one.terminate()
        tp.send_signal(signal.SIGTERM)  # torchrun sends it on to both ranks
        tp.wait(timeout=60)
        one.wait(timeout=30)
    log = logs[1].read_text()
    assert re.search(r"rank 1 of 2 \(pid \d+\) follows rank 0", log)
    assert "Application shutdown complete" in log and "follower is already gone" not in log
    assert "Connection closed by peer" not in log and "lost rank 0" not in log
    assert (
        log.count("Traceback") == 1 and "SignalException" in log
    )  # torchrun's own, for its signal


def test_a_dead_follower_turns_health_red_and_fails_requests_while_rank_0_serves_on(
    tmp_path, tiny_tokenizer
):
    # two plain processes (no torchrun, which would end rank 0 too): rank 1 is SIGKILLed
    serve, port = serve_args(tmp_path, tiny_tokenizer), free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    args = [*serve, "--port", str(port), "--tp", "2", "--dist.timeout=20"]
    procs = plain(*args, logs=logs)
    url = f"http://127.0.0.1:{port}"
    try:
        healthy(url, procs[0], logs[0])
        assert len(answer(url, BODIES[0])) > 3
        pid = int(re.search(r"rank 1 of 2 \(pid (\d+)\)", logs[1].read_text())[1])
        assert pid == procs[1].pid
        os.kill(pid, signal.SIGKILL)
        procs[1].wait(timeout=10)
        status, text = post(url + "/v1/completions", BODIES[1])
        assert status == 500 and json.loads(text)["error"]["type"] == "server_error", text
        status, text = post(url + "/v1/completions", BODIES[0])  # fails at once, as it says
        assert status == 500 and "tensor-parallel rank is gone" in text, text
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/health", timeout=10)
        assert e.value.code == 503
        assert "a tensor-parallel rank is gone" in json.loads(e.value.read())["reason"]
        assert procs[0].poll() is None  # still serving
    finally:
        for p in procs:
            p.terminate()
        procs[0].wait(timeout=30)
    assert "follower is already gone" in logs[0].read_text()
