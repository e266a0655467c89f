"""`zerolm speedrun PATH` on the user's own text: nothing of the bundled Tang poems gets in, the
samples start from the user's held-out documents, and the chat stage picks data that fits."""

import json
import lzma
import math
import random
import re
from itertools import islice

import pytest

from zerolm.cli import main
from zerolm.data.prepare import read_docs
from zerolm.data.shards import load_meta, open_split
from zerolm.eval.perplexity import evaluate_lm
from zerolm.infer.chat import chat_request, replies
from zerolm.model import load_model
from zerolm.speedrun import chat_data, sample_prompts, text_language
from zerolm.tokenizer import Tokenizer

HAN = re.compile(r"[\u3400-\u9fff]")
_WORDS = [
    "the",
    "a",
    "river",
    "town",
    "old",
    "light",
    "morning",
    "we",
    "walked",
    "along",
    "quiet",
    "road",
    "she",
    "said",
    "nothing",
    "because",
    "evening",
    "rain",
    "fell",
    "softly",
    "on",
    "roofs",
    "and",
    "gardens",
    "where",
    "children",
    "played",
    "until",
    "dark",
]
TINY = [
    "--quiet",
    "--train.steps=3",
    "--train.batch_size=2",
    "--train.warmup_steps=1",
    "--train.compile=false",
    "--train.eval_every=3",
    "--train.eval_batches=1",
    "--train.ckpt_every=3",
    "--model.d_model=32",
    "--model.n_layers=1",
    "--model.n_heads=2",
    "--model.max_seq_len=64",
    "--tokenizer.vocab_size=300",
    "--tokenizer.min_frequency=1",
]
TINY_SFT = """
[train]
steps = 2
batch_size = 4
warmup_steps = 1
eval_every = 2
eval_batches = 1
ckpt_every = 2
compile = false
"""


@pytest.fixture
def english(tmp_path):
    src = tmp_path / "my_texts"
    src.mkdir()
    rng = random.Random(0)
    for i in range(40):  # ~8 KB of English, one document per file
        words = [rng.choice(_WORDS) for _ in range(rng.randint(25, 45))]
        (src / f"note{i:02d}.txt").write_text(
            f"Note {i}. " + " ".join(words).capitalize() + ".\n", encoding="utf-8"
        )
    return src


def _docs(out):
    return [d for split in ("train", "val") for d in read_docs(out / "docs" / f"{split}.jsonl")]


def test_speedrun_on_a_path_trains_on_that_text_only(english, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["speedrun", str(english), "--out", str(out), "--no-sft", *TINY]) == 0
    printed = capsys.readouterr().out
    docs = _docs(out)
    assert len(docs) == 40 and all(d["source"].startswith(str(english)) for d in docs)
    assert not any(HAN.search(d["text"]) for d in docs)  # not one Tang poem
    tok, meta = Tokenizer.load(out / "tokenizer"), load_meta(out / "shards")
    for split in ("train", "val"):
        want = [tok.encode(d["text"]) for d in read_docs(out / "docs" / f"{split}.jsonl")]
        got = list(open_split(out / "shards", split).documents())
        assert [
            list(g) for g in got
        ] == want  # the shards hold the user's documents and nothing else
        assert meta["splits"][split]["tokens"] == sum(len(w) + 1 for w in want)
    samples = printed.split("samples")[1].split("final validation")[0]
    for d in read_docs(
        out / "docs" / "val.jsonl"
    ):  # prompted from the held-out documents' openings
        assert "\n  " + " ".join(d["text"].split()[:3]) in samples
    assert "明月" not in printed and "form adherence" not in printed and "poem" not in printed


@pytest.mark.slow
def test_speedrun_chat_stage_on_english_text_uses_english_conversations(english, tmp_path, capsys):
    out, recipe = tmp_path / "run", tmp_path / "tiny-sft.toml"
    recipe.write_text(TINY_SFT, encoding="utf-8")
    assert (
        main(
            [
                "speedrun",
                str(english),
                "--out",
                str(out),
                "--sft-config",
                str(recipe),
                "--sft.max_per_source=40",
                *TINY,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    cfg = (out / "sft" / "config.toml").read_text(encoding="utf-8")
    assert re.search(r'builtin = \["chitchat", "chatterbot-en"\]', cfg), cfg
    assert "max_per_source = 40" in cfg  # --sft.* overrides reach the SFT stage
    assert "poem requests" not in printed and "form adherence" not in printed
    assert "chat transcript" in printed and "user: " in printed and (out / "sft" / "model").is_dir()


def test_speedrun_align_needs_the_poem_corpus(english, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["speedrun", str(english), "--out", str(out), "--align", "dpo", *TINY]) == 2
    assert "--align" in capsys.readouterr().err and not out.exists()  # refused before any work


def test_chat_data_fits_the_text():
    tang, mine = True, False  # poem data (the bundled corpus) or the user's own text
    assert (
        chat_data(tang, "zh", user={}) == chat_data(tang, "en", user={}) == {"builtin": ["poems"]}
    )
    assert chat_data(mine, "en", user={}) == {"builtin": ["chitchat", "chatterbot-en"]}
    assert chat_data(mine, "zh", user={}) == {"builtin": ["chatterbot-zh"]}
    assert chat_data(mine, "other", user={}) is None  # nothing fits: stop after pretraining
    assert chat_data(mine, "other", user={"data": ("c.jsonl",)}) == {
        "builtin": []
    }  # the user's file alone
    assert chat_data(tang, "zh", user={"data": ("c.jsonl",), "builtin": ("poems",)}) == {}
    assert (
        chat_data(mine, "en", user={}, recipe={"builtin": ("chatterbot-en",)}) == {}
    )  # the user's recipe says


def test_language_and_prompts_come_from_the_documents():
    en = [{"text": "The quiet road along the river"}, {"text": "A short one"}]
    zh = [
        {"text": "秦川雄帝宅，函谷壮皇居。"},
        {"text": "Some English among Chinese"},
        {"text": "岩廊罢机务"},
    ]
    assert (
        text_language(en) == "en"
        and text_language(zh) == "zh"
        and text_language([{"text": "12 34"}]) == "other"
    )
    assert sample_prompts(en) == ["", "", "The quiet road", "A short one"]
    assert sample_prompts(zh) == [
        "",
        "",
        "秦川",
        "Some English among",
    ]  # each document's own script
    assert sample_prompts([]) == ["", ""]


def test_a_chat_reply_after_a_conversation_longer_than_the_window_still_comes(
    caplog, tiny_model, tiny_tokenizer
):
    # the SFT stage's samples on English chit-chat: multi-turn openers overflow a small window
    tok = tiny_tokenizer("bpe", ["hello there, friend " * 50])
    model = tiny_model("llama", vocab_size=tok.vocab_size, n_layers=1, n_heads=2, max_seq_len=32)
    long = [{"role": "user", "content": "hello there, friend " * 20}]
    reply, _ = replies(
        model, tok, [long, [{"role": "user", "content": "hi"}]], chat_request(tok, 96, seed=0)
    )
    assert (
        isinstance(reply, str) and "keeping the last" in caplog.text
    )  # the prompt's end kept, with a warning


TINY_POEM_SFT = TINY_SFT.replace("[train]", '[sft]\nbuiltin = ["poems"]\n\n[train]')
TINY_POEMS = [
    *(a for a in TINY if not a.startswith(("--tokenizer", "--model.max_seq_len"))),
    "--model.max_seq_len=128",  # a poem request and its answer fit
    "--tokenizer.kind=char",  # one token per character: the 200 poems use ~1,800 characters
    "--tokenizer.vocab_size=2000",
    "--data.dedup=none",
]


@pytest.fixture
def tang_200(tmp_path, monkeypatch):
    """The bundled Tang corpus cut to its first 200 poems (the whole one takes ~40 s to prepare)."""
    import zerolm.data.prepare
    import zerolm.data.sources

    with lzma.open(zerolm.data.sources.corpus_path("tang"), "rt", encoding="utf-8") as f:
        head = "".join(islice(f, 200))
    path = tmp_path / "tang.jsonl.xz"
    with lzma.open(path, "wt", encoding="utf-8") as f:
        f.write(head)
    for module in (zerolm.data.sources, zerolm.data.prepare):
        monkeypatch.setattr(module, "corpus_path", lambda name: path)
    return [json.loads(line) for line in head.splitlines()]


@pytest.mark.slow
def test_speedrun_on_the_poems_pretrains_then_fine_tunes_for_the_requested_form(
    tang_200, tmp_path, capsys
):
    out, recipe = tmp_path / "run", tmp_path / "tiny-sft.toml"
    recipe.write_text(TINY_POEM_SFT, encoding="utf-8")
    argv = ["speedrun", "--out", str(out), "--sft-config", str(recipe), "--eval-requests", "4"]
    assert main([*argv, *TINY_POEMS]) == 0
    printed = capsys.readouterr().out
    for d in ("docs", "shards", "tokenizer", "model", "sft/model"):
        assert (out / d).is_dir(), d
    docs = _docs(out)
    assert len(docs) == 200 and {d["text"] for d in docs} == {d["text"] for d in tang_200}
    # the figure printed is the saved model's bits per byte on the whole held-out split
    bpb = float(re.search(r"final validation bits per byte: (\S+)", printed).group(1))
    model, tok = load_model(out / "model"), Tokenizer.load(out / "model")
    assert math.isfinite(bpb) and bpb == pytest.approx(
        evaluate_lm(model, out / "shards", tok.token_byte_lengths())["val_bpb"], abs=1e-4
    )
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and math.isfinite(log[-1]["val_bpb"])
    samples = printed.split("samples")[1].split("final validation")[0]
    val = list(read_docs(out / "docs" / "val.jsonl"))  # prompted with two poems' first 2 characters
    assert len(val) >= 2 and all("\n  " + d["text"][:2] in samples for d in val[:2])
    # the SFT stage: the given recipe on poem requests made from the pretraining run's documents
    cfg = (out / "sft" / "config.toml").read_text(encoding="utf-8")
    assert 'builtin = ["poems"]' in cfg and "steps = 2" in cfg and str(out / "docs") in cfg
    sft_log = [json.loads(x) for x in (out / "sft" / "train_log.jsonl").read_text().splitlines()]
    assert sft_log[-1]["step"] == 2
    assert re.search(r"requested form \(4, greedy\): base \d+\.\d% -> SFT \d+\.\d%", printed)
    assert printed.count("  user: ") == 3 and "zerolm chat " + str(out / "sft" / "model") in printed
