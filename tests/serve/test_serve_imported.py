"""`zerolm serve` on an imported open model (a tiny random-init transformers LLaMA or Qwen2 with
SmolLM2's byte-level BPE tokenizer and ChatML template): chat through the model's own template,
raw completions, streaming, the model's stop ids, and the web UI showing its special tokens."""

import shutil

import pytest
import torch
from openai import OpenAI

from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.interop.hf import import_hf
from zerolm.model import load_model, save_model
from zerolm.serve.limits import Limits
from zerolm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
KEY = "sk-imported"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! 你好"},
    {"role": "user", "content": "床前明月光"},
]


@pytest.fixture(scope="module")
def source(hf_decoder, request):
    return hf_decoder(request.param)


# the HTTP, template and stop paths per architecture; the compiled and browser paths are the
# same code whatever the architecture, so they run on llama only (each costs ~20 s)
BOTH = pytest.mark.parametrize("source", ["llama", "qwen2"], indirect=True)
LLAMA = pytest.mark.parametrize("source", ["llama"], indirect=True)


@pytest.fixture(scope="module")
def model_dir(source, tmp_path_factory):
    """The imported model directory; overrides tests/serve/conftest.py's, so `launch` serves it."""
    out = tmp_path_factory.mktemp("imported") / "tiny"
    import_hf(source, out)
    return out


@pytest.fixture(scope="module")
def hf_tok(source):
    return transformers.AutoTokenizer.from_pretrained(source)


def _client(srv) -> OpenAI:
    return OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _greedy(model_dir, ids: list[int], n: int, stops=()) -> list[int]:
    """The same model's greedy continuation by the engine alone: what the server must return."""
    req = GenerateRequest(
        max_new_tokens=n, sampling=SamplingParams(temperature=0), stop_token_ids=tuple(stops)
    )
    return Engine(load_model(model_dir)).generate([ids], req)[0]


@BOTH
def test_models_card_lists_the_model_s_own_special_tokens(launch, model_dir):
    card = _client(launch(api_key=KEY)).models.list().data[0]
    extra = card.model_extra or {}
    assert extra["special_tokens"] == {
        "bos": "<|im_start|>",
        "eos": "<|im_end|>",
        "pad": "<|im_end|>",
        "unk": "<|endoftext|>",
        "turn_end": "<|im_end|>",
    }
    assert extra["stop_tokens"] == ["<|im_end|>"] and extra["chat_template"] == "model"
    assert card.max_model_len == 256  # the HF config's max_position_embeddings


@BOTH
def test_chat_renders_the_model_s_template_and_streams_the_same_text(launch, model_dir, hf_tok):
    srv = launch(api_key=KEY)
    tok = Tokenizer.load(model_dir)
    want_prompt = hf_tok.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert srv.server.chat_prompt(CHAT) == list(want_prompt)
    kw = dict(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
    full = _client(srv).chat.completions.create(**kw)
    assert full.usage.prompt_tokens == len(want_prompt)
    reply = _greedy(model_dir, list(want_prompt), 16, tok.stop_ids)
    assert full.choices[0].message.content == tok.decode(
        [t for t in reply if t not in tok.stop_ids]
    )
    chunks = list(_client(srv).chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content  # whole characters, byte-level BPE


@BOTH
def test_completions_are_raw_text_with_the_tokenizer_s_own_specials(launch, model_dir, hf_tok):
    srv = launch(api_key=KEY)
    tok = Tokenizer.load(model_dir)
    text = "The capital of France is"
    ids = hf_tok(text)["input_ids"]  # what transformers feeds: no template, its own specials
    assert srv.server.completion_prompt(text) == ids == tok.completion_ids([text])[0]
    r = _client(srv).completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    out = _greedy(model_dir, ids, 12, tok.eos_ids)
    assert r.choices[0].text == tok.decode([t for t in out if t not in tok.eos_ids])
    stream = _client(srv).completions.create(
        model="tiny", prompt=text, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text


@LLAMA
@pytest.mark.slow
def test_compiled_decode_of_the_imported_model_gives_the_eager_reply(launch, program_cache):
    kw = dict(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    eager = _client(launch(api_key=KEY, max_batch=2)).chat.completions.create(**kw)
    srv = launch(api_key=KEY, max_batch=2, compile=True)
    assert srv.server.scheduler.engine.compiled  # AOTInductor's step, not the eager fallback
    compiled = _client(srv).chat.completions.create(**kw)
    assert compiled.choices[0].message.content == eager.choices[0].message.content


@pytest.fixture(scope="module")
def says_im_end(source, tmp_path_factory):
    """The imported model changed to always predict <|im_end|>: every block adds nothing, every
    embedding has a large first channel, and only <|im_end|>'s head row reads it."""
    out = tmp_path_factory.mktemp("says-im-end") / "model"
    import_hf(source, out)
    tok, model = Tokenizer.load(out), load_model(out)
    with torch.no_grad():
        model.tok_emb.weight[:, 0] = 1e3
        for b in model.blocks:
            b.attn.o.weight.zero_()
            b.ffn.down.weight.zero_()
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.turn_end, 0] = 10.0
    save_model(model, out)
    return out


@LLAMA
class TestStopIds:
    @pytest.fixture
    def model_dir(self, says_im_end):  # `launch` serves this one in the class
        return says_im_end

    def test_the_end_of_turn_ends_chat_and_eos_ends_completions(self, launch, model_dir):
        tok = Tokenizer.load(model_dir)
        assert tok.stop_ids == (tok.turn_end,) == tok.eos_ids  # SmolLM2's: <|im_end|> both
        client = _client(launch(api_key=KEY, limits=Limits(max_tokens=8)))
        r = client.chat.completions.create(model="tiny", messages=CHAT[:2], max_tokens=8)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
        assert r.usage.completion_tokens == 1  # <|im_end|> ended the reply and is not shown
        c = client.completions.create(model="tiny", prompt="Hello", max_tokens=8)
        assert c.choices[0].finish_reason == "stop" and c.choices[0].text == ""


@LLAMA
@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: bash scripts/setup.sh test installs it")
def test_web_ui_shows_the_imported_model_s_special_tokens(launch):
    from playwright.sync_api import expect, sync_playwright

    srv = launch(api_key=KEY)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(e))
            page.goto(srv.url + "/")
            page.fill("#api_key", KEY)
            page.dispatch_event("#api_key", "change")
            expect(page.locator("#status")).to_contain_text("the model's chat template")
            specials = page.locator("#specials")
            expect(specials.locator("[data-role=bos] .special")).to_have_text("<|im_start|>")
            expect(specials.locator("[data-role=turn_end] .special")).to_have_text("<|im_end|>")
            expect(specials.locator("[data-role=stops] .special")).to_have_text("<|im_end|>")
            page.fill("#max_tokens", "4")
            page.fill("#temperature", "0")
            page.fill("#input", "Hi")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant")
            expect(reply).to_have_attribute("data-done", "length", timeout=30_000)
            reply.locator(".tok").nth(0).click()
            # the inspector's context: the ChatML prompt, its special tokens by their own names
            ctx = page.locator("#ctx span.special")
            expect(ctx.first).to_have_text("<|im_start|>", timeout=30_000)
            names = set(ctx.all_text_contents())
            assert names == {"<|im_start|>", "<|im_end|>"}, names
            assert errors == []
        finally:
            browser.close()
