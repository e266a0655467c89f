"""Serving benchmark: aggregate generated tokens/s and time to first token of `zerolm serve` under
1, 4 and 16 concurrent streaming clients, eager and `--compile`d (and, with --modes ...,tp2,
split over 2 processes by `torchrun ... serve --tp 2`), in one run.

The server is the real one (`python -m zerolm.cli serve MODEL`) in its own process on 127.0.0.1,
with `--server-threads` torch threads (default 1, leaving the other core to the clients, DESIGN §4).
Without --model it serves a random llama of the speedrun shape (d_model 256, 4 layers, window
128) with a BPE tokenizer trained here on the bundled chat corpora; speed does not depend on the
weights. Each client sends --requests chat requests one after another (greedy, max_tokens
--max-tokens, distinct Chinese/English prompts); a reply may end early at the model's <|end|>,
so tokens are counted from `usage`.

  tokens_per_s   all completion tokens ÷ wall time from the first request to the last reply
  ttft_p50/p95   seconds from sending a request to its first streamed chunk with text
  ratio_16_vs_1  tokens_per_s at 16 clients ÷ at 1 client (target: >= 4)
  ratio          {clients: compiled tokens_per_s ÷ eager tokens_per_s}
  tp2_ratio      {clients: tp2 tokens_per_s ÷ eager tokens_per_s} (tp2: 2 ranks of
                 --server-threads threads each, so twice the threads of the eager server)

Each mode is its own server (eager first): `runs` and `ratio_16_vs_1` are eager's,
`compiled_runs` and `compiled_ratio_16_vs_1` those of `zerolm serve --compile`, which decodes all
--max-batch slots in one compiled step each time (compiled into a fresh ZEROLM_CACHE at start-up;
`ready_s` is each server's start-up time, compiling included).

    .venv/bin/python bench/serve.py [--model DIR] [--clients 1,4,16] [--requests 4]
        [--max-tokens 64] [--modes eager,compiled,tp2] [--quick]

Prints progress to stderr and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import cpu_info  # bench/common.py (scripts run from bench/)

PROMPTS = [
    "写一首关于春天的诗",
    "Tell me about the sea.",
    "床前明月光",
    "What is your name?",
    "你好，今天天气怎么样？",
    "How do I learn to write poems?",
    "白日依山尽",
    "Good morning!",
]


def random_model(out: Path) -> Path:
    from zerolm.config import ModelConfig, TokenizerConfig
    from zerolm.data.chat_corpora import CHAT_CORPORA, read_chat_corpus
    from zerolm.model import build_model, save_model
    from zerolm.tokenizer.train import train_tokenizer

    text = [
        m["content"] for name in CHAT_CORPORA for c in read_chat_corpus(name) for m in c["messages"]
    ]
    tok = train_tokenizer(
        TokenizerConfig(kind="bpe", vocab_size=4096, min_frequency=2), text, progress=False
    )
    cfg = ModelConfig(preset="llama", d_model=256, n_layers=4, n_heads=4, max_seq_len=128)
    save_model(build_model(cfg, vocab_size=tok.vocab_size, seed=0), out, tok)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not come up")


async def one(port: int, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(time to first text chunk, completion tokens) of one streamed chat request, read with a
    minimal asyncio HTTP/1.1 client: a load generator must cost the shared CPU little."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"server answered {status!r}")
    ttft, used = None, 0
    async for line in reader:  # headers, then chunked SSE lines
        if not line.startswith(b"data: {"):
            continue
        if ttft is None and any(c["delta"].get("content") for c in json.loads(line[6:])["choices"]):
            ttft = time.perf_counter() - t0
        if b'"usage"' in line:
            used = json.loads(line[6:])["usage"]["completion_tokens"]
    writer.close()
    return (ttft if ttft is not None else time.perf_counter() - t0), used


async def load(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    async def worker(w: int):
        return [
            await one(port, PROMPTS[(w + r) % len(PROMPTS)] + f" {w}-{r}", max_tokens)
            for r in range(requests)
        ]

    t0 = time.perf_counter()
    results = [x for per in await asyncio.gather(*(worker(w) for w in range(clients))) for x in per]
    wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {
        "clients": clients,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 4),
    }


def measure(model: str, mode: str, levels: list[int], args, env: dict) -> dict:
    """Start a server (`--compile` for mode "compiled"), warm it up, run each client level."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "zerolm.cli", "serve", model, "--port", str(port)]
    if mode == "tp2":  # rank 0 serves on the port, rank 1 follows it
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        run += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
        cmd = [*run, "-m", "zerolm.cli", *cmd[3:], "--tp", "2"]
    cmd += ["--max-batch", str(max(levels)), "--max-queue", str(4 * max(levels))]
    cmd += ["--log-level", "warning"] + (["--compile"] if mode == "compiled" else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        ready = time.perf_counter() - t0
        asyncio.run(load(port, 1, 1, 8))  # warm-up
        runs = []
        for c in levels:
            r = asyncio.run(load(port, c, args.requests, args.max_tokens))
            print(f"  {mode} {json.dumps(r)}", file=sys.stderr)
            runs.append(r)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    by = {r["clients"]: r["tokens_per_s"] for r in runs}
    out = {"ready_s": round(ready, 1), "runs": runs}
    if 1 in by and 16 in by:
        out["ratio_16_vs_1"] = round(by[16] / by[1], 2)
    return out


def report(results: dict, levels: list[int], args, env: dict) -> dict:
    """The JSON line: eager's figures under the original keys, compiled ones under compiled_*."""
    import torch

    result = {
        "bench": "serve",
        "machine": {
            **cpu_info(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "dtype": "float32",
            "server_threads": args.server_threads,
            "omp_wait_policy": env["OMP_WAIT_POLICY"],
            "loadavg_end": os.getloadavg(),
        },
        "model": args.model or "random llama d256 L4 window 128 (speedrun shape)",
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
    }
    for mode, r in results.items():
        prefix = "" if mode == "eager" else f"{mode}_"
        result[f"{prefix}ready_s"] = r["ready_s"]
        result[f"{prefix}runs"] = r["runs"]
        if "ratio_16_vs_1" in r:
            result[f"{prefix}ratio_16_vs_1"] = r["ratio_16_vs_1"]
    if "eager" in results:
        eager = {x["clients"]: x["tokens_per_s"] for x in results["eager"]["runs"]}
        for mode, key in (("compiled", "ratio"), ("tp2", "tp2_ratio")):
            if mode in results:
                by = {x["clients"]: x["tokens_per_s"] for x in results[mode]["runs"]}
                result[key] = {str(c): round(by[c] / eager[c], 2) for c in levels}
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: a random speedrun-shaped llama)")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument(
        "--requests", type=int, default=4, help="requests per client, sent one after another"
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--server-threads", type=int, default=1, help="torch threads of the server process"
    )
    ap.add_argument(
        "--modes", default="eager,compiled", help="comma-separated: eager, compiled, tp2"
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1 request per client, 8 tokens"
    )
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 1, 8
    levels = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")
    if not set(modes) <= {"eager", "compiled", "tp2"}:
        ap.error(f"--modes takes eager, compiled and/or tp2, not {args.modes!r}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(random_model(Path(tmp) / "speedrun-shape"))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.server_threads),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "ZEROLM_CACHE": str(Path(tmp) / "cache"),  # a fresh compile, never an earlier run's
        }
        for mode in modes:
            results[mode] = measure(model, mode, levels, args, env)
    print(json.dumps(report(results, levels, args, env)))


if __name__ == "__main__":
    main()
