"""Hostile clients against a real `zerolm serve` on 127.0.0.1 (issue 18's acceptance), in one run:

  poison        requests torch cannot take (seed 2**64, temperature 1e-300, ...) sent while 8 seeded
                generations run (6 streamed, 2 not): each poison gets a 4xx or a well-defined 200,
                and the 8 finish intact (finish_reason, [DONE], the tokens of a solo run)
  fuzz          a raw table of malformed or extreme requests, each followed by a canary that must
                succeed
  schemathesis  property-based requests from /openapi.json (no 5xx)
  streams64     64 concurrent seeded streams, each equal to its solo run
  big_prompt    a 1 MiB prompt sent while streams run: their largest inter-chunk gap (want < 50 ms)
  slow_clients  slow-header and slow-body sockets past the server's fd limit (256): probes still
                answered, the log stays small
  shutdown      SIGTERM with clients that never read: seconds until the server exits

Without --model it serves a tiny random llama (d 64, 2 layers, window 1024) with a BPE tokenizer
trained here on Chinese + English text. The server runs with an API key, 1 torch thread,
RLIMIT_NOFILE 256 and its log in a file whose size is reported. Sections that break the server
restart it (counted). Prints progress to stderr and, as its last line, one JSON object with an "ok"
per section and "all_ok".

    timeout 900 .venv/bin/python bench/hostile.py [--model DIR] [--quick] [--only poison,fuzz,...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from common import cpu_info  # bench/common.py (scripts run from bench/)
from hostile_cases import (
    KEY,
    expectation_met,
    fuzz_cases,
    intact,
    outcome,
    poison_variants,
    post,
    request,
    send,
    verdict,
    well_defined,
)
from serve import PROMPTS, free_port, wait_ready

MAX_BODY = 2 << 20  # above 1 MiB, so the 1 MiB prompt reaches the server's own checks
NOFILE = 256
TEXT = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "Hello there! How are you today?",
    "白日依山尽，黄河入海流。",
    "The quick brown fox jumps over the lazy dog.",
] * 20
C = "/v1/completions"
CANARY = {"prompt": "Hello", "max_tokens": 4, "seed": 7, "temperature": 1.0}


def tiny_model(out: Path) -> Path:
    """As tests/serve/conftest.py: a random llama with a real BPE tokenizer."""
    from zerolm.config import ModelConfig, TokenizerConfig
    from zerolm.model import build_model, save_model
    from zerolm.tokenizer.train import train_tokenizer

    tok = train_tokenizer(
        TokenizerConfig(kind="bpe", vocab_size=320, min_frequency=1), TEXT, progress=False
    )
    cfg = ModelConfig(
        preset="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=1024
    )
    save_model(build_model(cfg, vocab_size=tok.vocab_size, seed=0), out, tok)
    return out


def _child_limits():  # runs in the server process before exec
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the server dies with this script


class ServerProc:
    """`python -m zerolm serve` in its own process; restarted when a section leaves it broken."""

    def __init__(self, model: str, tmp: Path):
        self.model, self.tmp, self.starts, self.proc, self.logs = model, tmp, 0, None, []

    def start(self) -> None:
        self.port = free_port()
        self.logs.append(self.tmp / f"server-{self.starts}.log")
        self.starts += 1
        cmd = [
            sys.executable,
            "-m",
            "zerolm",
            "serve",
            self.model,
            "--port",
            str(self.port),
            "--api-key",
            KEY,
            "--max-batch",
            "64",
            "--max-queue",
            "256",
            "--max-tokens",
            "1000",
            "--max-body-bytes",
            str(MAX_BODY),
            "--log-level",
            "warning",
        ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        }
        with open(self.logs[-1], "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_child_limits
            )
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_ready(self.url, self.proc)
        except RuntimeError as e:
            self.stop(5)
            raise RuntimeError(
                f"{e}; its log ends: {self.logs[-1].read_text(errors='replace')[-600:]}"
            ) from None

    def stop(self, deadline: float = 10.0) -> float:
        """SIGTERM, then SIGKILL after `deadline` s; returns the seconds until it exited."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.perf_counter()
        self.proc.terminate()
        try:
            self.proc.wait(deadline)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.perf_counter() - t0

    def restart(self) -> None:
        self.stop(5)
        self.start()

    def log_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.logs if p.exists())


class Hostile:
    def __init__(self, srv: ServerProc, quick: bool):
        self.srv, self.quick = srv, quick
        self.canary_ref = None
        self.window = 1024

    async def canary(self) -> bool:
        o = outcome(await send(self.srv.port, post(C, CANARY), 30), False)
        if self.canary_ref is None and o["status"] == 200:
            self.canary_ref = o
        ref = self.canary_ref or {}
        return (
            o["status"] == 200 and o.get("finish") is not None and o.get("text") == ref.get("text")
        )

    async def ensure(self) -> bool:
        """Restart the server if it does not answer the canary; True when it had to."""
        if self.srv.proc.poll() is None and await self.canary():
            return False
        await asyncio.to_thread(self.srv.restart)
        return True

    @staticmethod
    async def _timed(coro):
        return await coro, time.perf_counter()

    async def run(
        self, bodies: list[dict], timeout: float = 120, started: list | None = None
    ) -> list:
        tasks = [
            asyncio.create_task(
                send(self.srv.port, post(C, b), timeout, started[i] if started else None)
            )
            for i, b in enumerate(bodies)
        ]
        return await asyncio.gather(*tasks)

    # -- sections ----------------------------------------------------------------------------------
    async def poison(self) -> dict:
        m = min(120 if self.quick else 300, self.window // 3)
        live, refs = [], []
        for i in range(
            8
        ):  # seeds whose solo run lasts to max_tokens, so that they are in flight at the poison
            for j in range(8):
                b = {
                    "prompt": PROMPTS[i],
                    "max_tokens": m,
                    "seed": 100 * i + j,
                    "temperature": 1.0,
                    "top_p": 0.95,
                    "logprobs": 0,
                    "stream": i < 6,
                }
                o = outcome((await self.run([b]))[0], b["stream"])
                if o["status"] == 200 and o["finish"] == "length":
                    break
            live.append(b)
            refs.append(o)
        rows = []
        for name, path, body in poison_variants(self.quick):
            started = [asyncio.Event() for _ in live]
            tasks = [
                asyncio.create_task(self._timed(send(self.srv.port, post(C, b), 120, started[i])))
                for i, b in enumerate(live)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started[:6])), 30)
            prep, p_end = await self._timed(send(self.srv.port, post(path, body), 60))
            done = await asyncio.gather(*tasks)
            outs = [outcome(r, b["stream"]) for (r, _), b in zip(done, live)]
            row = {
                "variant": name,
                "status": prep.status,
                "well_defined": well_defined(prep, body.get("stream", False)),
                "live_intact": sum(intact(o, ref) for o, ref in zip(outs, refs)),
                "live_in_flight_at_poison": sum(end > p_end for _, end in done),
            }
            if prep.status is None or prep.status >= 500:
                row["body"] = prep.error or prep.body[:160].decode("utf-8", "replace")
            row["live"] = dict(collections.Counter(verdict(o, ref) for o, ref in zip(outs, refs)))
            row["live_chunks"] = [o.get("chunks") for o in outs[:6]]
            row["server_restarted"] = await self.ensure()
            rows.append(row)
            print(f"  poison {json.dumps(row, ensure_ascii=False)}", file=sys.stderr)
        all_intact = all(r["live_intact"] == 8 for r in rows)
        p5 = sum(r["status"] is None or r["status"] >= 500 for r in rows)
        return {
            "ok": all_intact and p5 == 0 and all(r["well_defined"] for r in rows),
            "all_intact": all_intact,
            "poison_5xx": p5,
            "max_tokens": m,
            "live_solo_finish": [r.get("finish") for r in refs],
            "variants": rows,
        }

    async def fuzz(self) -> dict:
        rows = []
        for name, raw, expect in fuzz_cases(MAX_BODY):
            rep = await send(self.srv.port, raw, 30)
            row = {
                "case": name,
                "status": rep.status,
                "expect": expect,
                "met": expectation_met(expect, rep),
            }
            if rep.status is None or rep.status >= 500:
                row["body"] = rep.error or rep.body[:160].decode("utf-8", "replace")
            if rep.status == 405:
                row["allow"] = rep.headers.get("allow")
            row["canary"] = await self.canary()
            if not row["canary"]:
                row["server_restarted"] = await self.ensure()
            rows.append(row)
        n5 = sum(r["status"] is not None and r["status"] >= 500 for r in rows)
        can = sum(r["canary"] for r in rows)
        failed = [
            f"{r['case']}: {r['status']}{' without Allow' if r['status'] == 405 else ''} "
            f"(want {r['expect']})"
            for r in rows
            if not r["met"]
        ]
        return {
            "ok": len(rows) >= 60 and n5 == 0 and can == len(rows),
            "fuzz_cases": len(rows),
            "fuzz_5xx": n5,
            "canaries_ok": can,
            "no_answer": sum(r["status"] is None for r in rows),
            "expectations_met": len(rows) - len(failed),
            "expectations_failed": failed,
            "table": rows,
        }

    async def streams64(self) -> dict:
        n, m = (16, 24) if self.quick else (64, 48)
        bodies = [
            {
                "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}",
                "max_tokens": m,
                "seed": i,
                "temperature": 1.0,
                "logprobs": 0,
                "stream": True,
            }
            for i in range(n)
        ]
        solo = [outcome((await self.run([b]))[0], True) for b in bodies]
        t0 = time.perf_counter()
        together = [outcome(r, True) for r in await self.run(bodies)]
        equal = sum(intact(o, s) for o, s in zip(together, solo))
        return {
            "ok": equal == n,
            "streams": n,
            "equal": equal,
            "max_tokens": m,
            "solo_ok": sum(s["status"] == 200 for s in solo),
            "wall_s": round(time.perf_counter() - t0, 2),
        }

    async def big_prompt(self) -> dict:
        """Three trials (fresh streams each); the verdict is on the median of their largest gaps, so
        that one scheduling hiccup of a loaded machine is no stall, while a stall the prompt causes
        shows every time."""
        k, m = (4, 400) if self.quick else (8, 960)
        m = min(m, self.window - 64)
        unit = "明月光 moonlight, "
        text = unit * ((1 << 20) // len(unit.encode()))
        raw = post(
            C, {"prompt": text, "max_tokens": 4}
        )  # built before any clock starts: it holds this loop too
        trials = [await self._big_trial(k, m, raw, t) for t in range(3)]
        gaps = sorted(t["max_gap_ms"] for t in trials)
        base = sorted(t["baseline_max_gap_ms"] for t in trials)[1]
        return {
            "ok": gaps[1] < 50 and all(t["streams_running_after_big"] for t in trials),
            "max_gap_ms": gaps[1],
            "excess_over_baseline_ms": round(gaps[1] - base, 1),
            "trial_max_gaps_ms": [t["max_gap_ms"] for t in trials],
            "baseline_max_gaps_ms": [t["baseline_max_gap_ms"] for t in trials],
            "big_status": trials[0]["big_status"],
            "big_answer_s": [t["big_answer_s"] for t in trials],
            "prompt_bytes": len(text.encode()),
            "streams": k,
            "streams_running_after_big": min(t["streams_running_after_big"] for t in trials),
            "streams_finished": min(t["streams_finished"] for t in trials),
            "big_body": trials[0]["big_body"],
        }

    async def _big_trial(self, k: int, m: int, raw: bytes, trial: int) -> dict:
        bodies = [
            {
                "prompt": f"{PROMPTS[i]} big {trial}",
                "max_tokens": m,
                "temperature": 0,
                "stream": True,
            }
            for i in range(k)
        ]  # greedy: a random model's loops rarely hit EOS, so the streams outlast the probe
        started = [asyncio.Event() for _ in bodies]
        tasks = asyncio.create_task(self.run(bodies, 120, started))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
        await asyncio.sleep(0.3)  # a baseline of undisturbed chunks
        t_send = time.perf_counter()
        big = await send(self.srv.port, raw, 60)
        t_done = time.perf_counter()
        reps = await tasks
        gap = base = 0.0
        running = 0
        for r in reps:
            ts = [t for t, _ in r.chunks]
            running += bool(ts) and ts[-1] > t_done
            for a, b in zip(ts, ts[1:]):
                if (
                    b > t_send and a < t_done + 0.5
                ):  # also what a worker thread may hold up after the answer
                    gap = max(gap, b - a)
                elif b <= t_send and a >= t_send - 0.3:
                    base = max(base, b - a)
        outs = [outcome(r, True) for r in reps]
        return {
            "max_gap_ms": round(gap * 1e3, 1),
            "baseline_max_gap_ms": round(base * 1e3, 1),
            "big_status": big.status,
            "big_answer_s": round(t_done - t_send, 3),
            "streams_running_after_big": running,
            "streams_finished": sum(
                o["status"] == 200 and o.get("done") and bool(o.get("finish")) for o in outs
            ),
            "big_body": big.body[:200].decode("utf-8", "replace") if big.status != 200 else None,
        }

    async def schemathesis(self, tmp: Path) -> dict:
        n = 10 if self.quick else 40
        exe = Path(sys.executable).parent / "schemathesis"
        rep = tmp / "schemathesis"
        cmd = [
            str(exe),
            "run",
            f"{self.srv.url}/openapi.json",
            "--max-examples",
            str(n),
            "--checks",
            "not_a_server_error",
            "-H",
            f"Authorization: Bearer {KEY}",
            "--report",
            "har,json",
            "--report-har-path",
            str(rep / "har.json"),
            "--report-json-path",
            str(rep / "report.json"),
            "--request-timeout",
            "30",
            "--seed",
            "18",
            "--no-color",
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--suppress-health-check",
            "all",
        ]
        if self.quick:  # the boundary values (5e-324, ...) of the generation endpoints
            cmd += [
                "--phases",
                "coverage",
                "--mode",
                "positive",
                "--include-path-regex",
                "completions$",
            ]
        t0 = time.perf_counter()
        proc = await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, text=True, timeout=240 if self.quick else 600
        )
        with urllib.request.urlopen(self.srv.url + "/openapi.json", timeout=10) as r:
            documented = {f"{m.upper()} {p}" for p, ms in json.load(r)["paths"].items() for m in ms}
        per_op, other, fives, messages = {}, 0, 0, []
        har = rep / "har.json" if (rep / "har.json").exists() else None
        for e in json.loads(har.read_text())["log"]["entries"] if har else []:
            op = f"{e['request']['method']} {urllib.parse.urlsplit(e['request']['url']).path}"
            if op in documented:
                per_op[op] = per_op.get(op, 0) + 1
            else:
                other += 1  # coverage's unsupported-method probes
            if e["response"]["status"] >= 500:
                fives += 1
                msg = (e["response"].get("content") or {}).get("text", "")[:160]
                if msg not in messages and len(messages) < 5:
                    messages.append(msg)
        report = rep / "report.json" if (rep / "report.json").exists() else None
        summary = json.loads(report.read_text()) if report else {}
        with_body = [c for op, c in per_op.items() if op.startswith("POST")]
        return {
            "ok": bool(per_op) and fives == 0 and min(with_body or [0]) >= n,
            "max_examples": n,
            "operations": summary.get("operations", {}).get("tested"),
            "examples": sum(per_op.values()),
            "per_operation": per_op,
            "other_requests": other,
            "st_5xx": fives,
            "five_xx_bodies": messages,
            "failures": [
                f"{f['code']} {f['title']} x{f['count']}: {f['operations']}"
                for f in summary.get("failures", [])
            ],
            "exit_code": proc.returncode,
            "wall_s": round(time.perf_counter() - t0, 1),
            "stderr_tail": proc.stderr[-300:] if not har else None,
        }

    async def slow_clients(self) -> dict:
        n_head, n_body = 200, 100  # 300 sockets against RLIMIT_NOFILE 256
        hold, probe_timeout = (5.0, 5.0) if self.quick else (12.0, 10.0)
        log0 = self.srv.log_bytes()
        conns, closed = [], 0

        async def watch(reader):  # any byte or EOF from the server: it shed this client
            nonlocal closed
            with contextlib.suppress(OSError):
                await reader.read(1)
            closed += 1

        for i in range(n_head + n_body):
            r, w = await asyncio.open_connection("127.0.0.1", self.srv.port)
            if i < n_head:
                w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            else:
                w.write(request("POST", C, b"", length="100000") + b'{"prompt": "')
            conns.append((w, asyncio.create_task(watch(r))))
        t0 = time.perf_counter()
        probes = []
        while time.perf_counter() - t0 < hold:
            for w, _ in conns:
                if not w.is_closing():
                    w.write(b"a")  # one byte a second: never finished, never idle
            probes.append(
                asyncio.create_task(send(self.srv.port, request("GET", "/health"), probe_timeout))
            )
            await asyncio.sleep(1.0)
        answers = await asyncio.gather(*probes)
        held = time.perf_counter() - t0
        for w, t in conns:
            w.close()
            t.cancel()
        await asyncio.sleep(1.0)
        after = await send(self.srv.port, request("GET", "/health"), 10)
        log = self.srv.log_bytes() - log0
        answered = sum(a.status is not None for a in answers)
        return {
            "ok": answered == len(answers) and log < 1_000_000,
            "sockets": n_head + n_body,
            "slow_header": n_head,
            "slow_body": n_body,
            "server_nofile": NOFILE,
            "held_s": round(held, 1),
            "probes": len(answers),
            "probes_answered": answered,
            "probe_statuses": sorted({str(a.status) for a in answers}),
            "shed_by_server": closed,
            "after_release_status": after.status,
            "log_bytes": log,
        }

    async def shutdown(self) -> dict:
        """SIGTERM while clients hold streams they never read (tiny receive buffers, so sends
        block)."""
        cap = 15.0 if self.quick else 40.0
        body = json.dumps(
            {
                "prompt": "Hi",
                "max_tokens": min(1000, self.window - 8),
                "n": 8,
                "logprobs": 20,
                "temperature": 0,
                "stream": True,
            }
        ).encode()  # greedy runs to max_tokens: MBs unread
        socks = []
        for _ in range(4):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", self.srv.port))
            s.sendall(request("POST", C, body))
            socks.append(s)
        await asyncio.sleep(1.0)
        took = await asyncio.to_thread(self.srv.stop, cap)
        for s in socks:
            s.close()
        return {
            "ok": took < cap,
            "exit_s": round(took, 1),
            "deadline_s": cap,
            "killed": took >= cap,
        }


SECTIONS = ["poison", "fuzz", "streams64", "big_prompt", "schemathesis", "slow_clients", "shutdown"]


async def main_async(h: Hostile, only: list[str], tmp: Path) -> dict:
    out = {}
    for name in only:
        t0 = time.perf_counter()
        try:
            if name != "shutdown":
                await h.ensure()
            out[name] = await (
                h.schemathesis(tmp) if name == "schemathesis" else getattr(h, name)()
            )
        except Exception as e:  # one section's crash must not lose the others' figures
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out[name]["section_s"] = round(time.perf_counter() - t0, 1)
        brief = {
            k: v
            for k, v in out[name].items()
            if k not in ("table", "variants", "expectations_failed")
        }
        print(f"{name}: {json.dumps(brief, ensure_ascii=False)}", file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: a tiny random llama built here)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="reduced run (~1 min): fewer poisons, streams, examples",
    )
    ap.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}"
    )
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    if unknown := set(only) - set(SECTIONS):
        raise SystemExit(f"unknown sections {sorted(unknown)}: choose from {SECTIONS}")
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(124)
    )  # `timeout` ends us: still stop the server
    load0, t0 = os.getloadavg(), time.perf_counter()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(tiny_model(tmp / "tiny"))
        srv = ServerProc(model, tmp)
        try:
            srv.start()
            h = Hostile(srv, args.quick)
            with urllib.request.urlopen(
                urllib.request.Request(
                    srv.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}
                ),
                timeout=10,
            ) as r:
                h.window = json.load(r)["data"][0]["max_model_len"]
            results = asyncio.run(main_async(h, only, tmp))
        finally:
            srv.stop(5)
        log_bytes = srv.log_bytes()
    result = {
        "bench": "hostile",
        "quick": args.quick,
        "model": args.model or "random llama d64 L2 window 1024, BPE 320",
        "machine": {
            **cpu_info(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "server_threads": 1,
            "server_nofile": NOFILE,
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
        },
        "server_starts": srv.starts,
        "server_log_bytes": log_bytes,
        "wall_s": round(time.perf_counter() - t0, 1),
        **results,
        "all_ok": all(r.get("ok") for r in results.values()),
    }
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
