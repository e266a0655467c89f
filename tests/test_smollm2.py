"""The real open model end to end: SmolLM2-135M-Instruct imported from its HF directory, then
used by `zerolm generate`, `chat`, `serve` and `export` as a model zerolm trained, each checked
against transformers on the same weights, tokenizer and chat template."""

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from zerolm.infer.chat import chat_request
from zerolm.infer.engine import Engine
from zerolm.infer.sampling import SamplingParams
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import prompt_ids, render

pytestmark = pytest.mark.slow  # real 135M weights, CLI subprocesses
transformers = pytest.importorskip("transformers")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATIONS = [
    QUESTION,
    [{"role": "system", "content": "Answer in one word."}, *QUESTION],
    [
        *QUESTION,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? 请用中文回答。"},
    ],
]


@contextlib.contextmanager
def running_server(model_dir):
    """`zerolm serve MODEL` in a thread on a free local port; yields its URL."""
    import uvicorn

    from zerolm.serve.app import create_app
    from zerolm.serve.edge import uvicorn_config
    from zerolm.serve.server import load_server

    server = load_server(model_dir, name="smollm2", max_batch=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(
        uvicorn_config(
            create_app(server), server.limits, host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def zerolm(*args):
    return subprocess.run(
        [sys.executable, "-m", "zerolm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def imported(smollm2_hf, tmp_path_factory):
    """(the zerolm model directory, `zerolm import`'s stdout)."""
    out = tmp_path_factory.mktemp("smollm2") / "model"
    r = zerolm("import", "--from", "hf", smollm2_hf, "--out", out)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


@pytest.fixture(scope="module")
def hf_tok(smollm2_hf):
    return transformers.AutoTokenizer.from_pretrained(smollm2_hf)


@pytest.fixture(scope="module")
def hf_model(smollm2_hf):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()


def _template_ids(hf_tok, messages, generation=True) -> list[int]:
    return list(
        hf_tok.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=True, return_dict=False
        )
    )


def test_import_is_fast_and_says_what_it_imported(imported):
    _, line = imported
    assert line.count("\n") == 1  # one line
    assert "134,515,008 parameters" in line and "llama decoder: 30 layers, d 576" in line
    assert "9 heads / 3 kv, head_dim 64" in line and "tied head" in line
    assert "bos <|im_start|>, eos <|im_end|>" in line and "turn_end <|im_end|>" in line
    assert "chat template: the model's own" in line
    seconds = float(re.search(r" in ([\d.]+) s;", line).group(1))
    print(f"import: {seconds:.1f} s")
    assert seconds < 30


def test_generate_continues_the_capital_of_france_with_paris(imported):
    r = zerolm(
        "generate", "--model", imported[0], "--temperature", "0", "--max-new-tokens", "4",
        "The capital of France is",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris"), r.stdout


def test_chat_answers_through_the_chatml_template_transformers_renders(imported, hf_tok):
    r = zerolm(
        "chat", "--model", imported[0], "--prompt", QUESTION[0]["content"], "--temperature", "0",
        "--show-prompt",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    shown = re.search(r"^prompt \((\d+) tokens\): (.*)$", r.stderr, re.M)
    want = hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert json.loads(shown.group(2)) == want
    assert int(shown.group(1)) == len(_template_ids(hf_tok, QUESTION))
    assert "<|im_start|>assistant\n" in want and "Paris" in r.stdout, r.stdout


def test_prompt_ids_and_masks_are_transformers_template_ids(imported, hf_tok):
    tok = Tokenizer.load(imported[0])
    for conv in CONVERSATIONS:
        assert prompt_ids(tok, conv) == _template_ids(hf_tok, conv)
        ids, mask, _ = render(tok, conv)
        assert ids == _template_ids(hf_tok, conv, generation=False)
        taught = tok.decode([i for i, m in zip(ids, mask) if m])  # assistant turns only
        assert taught == "".join(
            m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"
        )  # each reply and its end of turn (the newline after it is the template's)
    text = "The capital of France is"
    assert tok.completion_ids([text])[0] == hf_tok(text)["input_ids"]


def test_chat_reply_stops_at_the_end_of_turn_as_transformers_generate_does(
    imported, hf_tok, hf_model
):
    tok = Tokenizer.load(imported[0])
    assert tok.stop_ids == (tok.token_id("<|im_end|>"),) and tok.eos_ids == tok.stop_ids
    prompt = _template_ids(hf_tok, CONVERSATIONS[1])
    req = chat_request(tok, 40, SamplingParams(temperature=0))
    ours = Engine(load_model(imported[0])).generate([prompt], req)[0]
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
            eos_token_id=list(tok.stop_ids), pad_token_id=tok.pad_id,
        )[0, len(prompt):].tolist()  # fmt: skip
    assert ours == theirs
    assert ours[-1] in tok.stop_ids and len(ours) < 40  # it ended at <|im_end|>, not the limit
    assert "Paris" in tok.decode(ours[:-1])


def test_serve_answers_the_openai_client_through_the_template(imported):
    from openai import OpenAI

    with running_server(imported[0]) as url:
        client = OpenAI(base_url=url + "/v1", api_key="sk-s", max_retries=0, timeout=120)
        kw = dict(model="smollm2", messages=QUESTION, max_tokens=32, temperature=0)
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "stop" and "Paris" in r.choices[0].message.content
        chunks = client.chat.completions.create(**kw, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r.choices[0].message.content
        c = client.completions.create(
            model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0
        )
        assert c.choices[0].text.startswith(" Paris")


def test_export_gives_transformers_the_original_back(imported, hf_tok, hf_model, tmp_path):
    r = zerolm("export", imported[0], "--format", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok_back = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = _template_ids(tok_back, CONVERSATIONS[2])
    assert prompt == _template_ids(hf_tok, CONVERSATIONS[2])
    x = torch.tensor([prompt])
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf_model(x).logits)
        # generate with each directory's own generation config: the same reply, ended alike
        ours = back.generate(x, max_new_tokens=24, do_sample=False)
        theirs = hf_model.generate(x, max_new_tokens=24, do_sample=False)
    assert ours.tolist() == theirs.tolist()
