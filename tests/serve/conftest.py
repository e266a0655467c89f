import os
import socket
import threading
import time

import pytest
import torch

from zerolm.config import ModelConfig, TokenizerConfig
from zerolm.model import build_model, save_model
from zerolm.serve.app import create_app
from zerolm.serve.edge import uvicorn_config
from zerolm.serve.limits import Limits
from zerolm.serve.server import load_server
from zerolm.tokenizer.train import train_tokenizer

TEXT = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "Hello there! How are you today?",
    "白日依山尽，黄河入海流。",
    "The quick brown fox jumps over the lazy dog.",
] * 20
LIMITS = Limits(max_tokens=48, max_n=4, max_messages=8, max_body_bytes=20_000)
API_KEY = "sk-test-123"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random llama with a real BPE tokenizer (Chinese + English), saved as a model
    directory."""
    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(
        TokenizerConfig(kind="bpe", vocab_size=320, min_frequency=1), TEXT, progress=False
    )
    model = build_model(
        ModelConfig(
            preset="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=1024
        ),
        vocab_size=tok.vocab_size,
        seed=0,
    )
    save_model(model, root / "tiny", tok)
    return root / "tiny"


class Running:
    def __init__(self, server, api_key):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = server
        self.uv = uvicorn.Server(
            uvicorn_config(
                create_app(server, api_key),
                server.limits,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
            )
        )
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.uv.should_exit = True
        self.thread.join(timeout=15)


def start(model_dir, api_key=None, limits=LIMITS, **kw):
    torch.manual_seed(0)
    return Running(load_server(model_dir, limits=limits, name="tiny", **kw), api_key)


@pytest.fixture
def launch(model_dir):
    """Start more servers on the tiny model: launch(api_key=None, limits=LIMITS, **Server kwargs);
    stopped after the test."""
    started = []

    def go(api_key=None, **kw):
        started.append(start(model_dir, api_key, **kw))
        return started[-1]

    yield go
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def live(model_dir):
    """The real server on 127.0.0.1 (uvicorn in a thread), with an API key."""
    srv = start(model_dir, API_KEY, max_batch=8, max_queue=64)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def program_cache(tmp_path_factory):
    """A private compiled-decode cache (ZEROLM_CACHE) for the compiled servers and schedulers: the
    tiny model's step over 8 slots is compiled once (20-60 s) and loaded by every later one."""
    old = os.environ.get("ZEROLM_CACHE")
    os.environ["ZEROLM_CACHE"] = str(tmp_path_factory.mktemp("zerolm-cache"))
    yield os.environ["ZEROLM_CACHE"]
    if old is None:
        del os.environ["ZEROLM_CACHE"]
    else:
        os.environ["ZEROLM_CACHE"] = old


@pytest.fixture(scope="module")
def live_compiled(model_dir, program_cache):
    """The real server as `zerolm serve --compile` runs it: decode steps over all 8 slots
    compiled."""
    srv = start(model_dir, API_KEY, max_batch=8, max_queue=64, compile=True)
    assert srv.server.scheduler.engine.compiled  # the step compiled (not fallen back to eager)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live):
    from openai import OpenAI

    return OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
