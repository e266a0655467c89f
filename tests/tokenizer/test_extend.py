"""`zerolm tokenizer extend`: new tokens as BPE merges on SmolLM2's byte-level BPE, checked against
transformers on the saved files; the embedding/head resize keeps old logits exactly."""

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zerolm.cli import main
from zerolm.interop.hf import import_hf
from zerolm.model import load_model, save_model
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.extend import (
    check_extendable,
    choose_tokens,
    extend_tokenizer,
    han_counts,
)
from zerolm.transforms.resize import resize_vocab, split_corpus

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tang():
    train, held = split_corpus("tang")
    return train[:6000], held[:400]


@pytest.fixture(scope="module")
def english():
    return [t[:20000] for t in split_corpus("shakespeare")[1]]


@pytest.fixture(scope="module")
def extended(smollm2_hf, tang, tmp_path_factory):
    """SmolLM2's tokenizer + 300 Tang characters/words, saved, and transformers' load of it."""
    base = Tokenizer.load(smollm2_hf)
    ext = extend_tokenizer(base, choose_tokens(base, *han_counts(tang[0]), 300), smollm2_hf)
    out = tmp_path_factory.mktemp("ext-tok")
    ext.tokenizer.save(out)
    return base, ext, Tokenizer.load(out), transformers.AutoTokenizer.from_pretrained(out)


def _mixed(rng: random.Random, chars: list[str]) -> str:
    pools = [chars, list("abc xyz,.!?\n\t 0123"), ["😀", "é", "ß", "👍🏽", "\u200d", "ア", "한"]]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40)))


def test_extended_tokenizer_matches_transformers(extended, tang, english):
    base, ext, loaded, hf = extended
    new = set(range(base.vocab_size, loaded.vocab_size))
    assert len(ext.added) == 300 and loaded.vocab_size == base.vocab_size + 300 + len(
        ext.intermediate
    )
    assert loaded.sha256 == ext.tokenizer.sha256 and loaded.layout == "hf"
    assert loaded.eos_ids == base.eos_ids and loaded.turn_end == base.turn_end  # roles kept
    assert all(len(ids) == 1 and ids[0] in new for ids in loaded.encode_batch(list(ext.added)))
    rng = random.Random(0)
    chars = [t for t in ext.added if len(t) == 1]
    texts = tang[1] + english + [_mixed(rng, chars) for _ in range(300)]
    for text, ids in zip(texts, loaded.encode_batch(texts)):
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:40]
        assert loaded.decode(ids) == text
    # English (no Han bytes) encodes exactly as the base; Tang text uses the new tokens
    assert loaded.encode_batch(english) == base.encode_batch(english)
    zh_before = sum(map(len, base.encode_batch(tang[1])))
    zh_after = sum(map(len, loaded.encode_batch(tang[1])))
    assert zh_after < 0.75 * zh_before
    assert any(i in new for ids in loaded.encode_batch(tang[1]) for i in ids)


POEM = "床前明月光疑是地上霜举头望低思故乡白日依山尽黄河入海流欲穷千里目更上一层楼，。 a1\n"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60) | st.text(st.sampled_from(POEM), max_size=60))
def test_extended_round_trips_any_text_as_transformers(extended, text):
    base, _, loaded, hf = extended
    ids = loaded.encode(text)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    # exact wherever the base is: SmolLM2's vocabulary lacks a few lead bytes (U+40000's F1)
    assert loaded.decode(ids) == base.decode(base.encode(text))


def test_choose_tokens_skips_single_tokens_and_orders_words(smollm2_hf, tiny_tokenizer, tang):
    base = Tokenizer.load(smollm2_hf)
    chars, pairs = han_counts(tang[0])
    chosen = choose_tokens(base, chars, pairs, 500)
    assert len(chosen) == len(set(chosen)) == 500
    assert all(len(base.encode(t)) > 1 for t in chosen)
    words = [t for t in chosen if len(t) > 1]
    assert words and all(c in chosen or len(base.encode(c)) == 1 for w in words for c in w)
    top = max((c for c in chars if len(base.encode(c)) > 1), key=chars.__getitem__)
    assert chosen[0] == top or chars[chosen[0]] * (len(base.encode(chosen[0])) - 1) >= chars[top]
    # zerolm's own pre-tokenizer isolates each Han character: characters only
    own = tiny_tokenizer("bpe")
    assert all(len(t) == 1 for t in choose_tokens(own, chars, pairs, 50))


def test_zerolm_tokenizer_extends_and_loads_in_transformers(tiny_tokenizer, tmp_path):
    own = tiny_tokenizer("bpe")
    ext = extend_tokenizer(own, ["举", "霜", "龙", " tokenization"], tmp_path)
    ext.tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert loaded.layout == "zerolm" and loaded.vocab_size > own.vocab_size
    for text in ["床前明月光，疑是地上霜。龙", "Hello tokenization there!", "举头 tokenization"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == loaded.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert len(loaded.encode(" tokenization")) == 1
    assert loaded.encode("Hello there!") == own.encode("Hello there!")


@pytest.mark.parametrize("tie", [True, False])
def test_resize_vocab_keeps_old_logits(tiny_model, tie):
    model = tiny_model("llama", vocab_size=64, tie_embeddings=tie).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        old_emb = model.tok_emb.weight.clone()
        resize_vocab(model, 70)
        after = model(ids)
    assert model.cfg.vocab_size == 70 and after.shape == (2, 12, 70)
    assert torch.equal(after[..., :64], before)
    assert torch.allclose(model.tok_emb.weight[64:], old_emb.mean(0).expand(6, -1), atol=1e-7)
    assert (model.lm_head is None) == tie
    with pytest.raises(ValueError, match="cannot shrink"):
        resize_vocab(model, 60)


def test_resize_vocab_reinitialises_padding_rows(tiny_model):
    model = tiny_model("llama", vocab_size=64, tie_embeddings=False)
    head = model.lm_head.weight.detach().clone()
    resize_vocab(model, 66, start=60)
    assert torch.equal(model.lm_head.weight[:60], head[:60])
    assert torch.allclose(model.lm_head.weight[60:], head[:60].mean(0).expand(6, -1), atol=1e-7)


@pytest.fixture(scope="module")
def imported(hf_decoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "model"
    import_hf(hf_decoder("llama"), out)
    return out


@pytest.mark.slow
def test_cli_extend_from_corpus(imported, tang, english, tmp_path, capsys):
    corpus = tmp_path / "poems.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in tang[0][:3000] + tang[1]))
    out = tmp_path / "ext"
    args = ["tokenizer", "extend", "--model", str(imported), "--from-corpus", str(corpus)]
    assert main([*args, "--count", "200", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        report["added"] == 200
        and report["vocab_size_after"] == 49152 + 200 + report["intermediate"]
    )
    zh, en = report["held_out"]["zh"], report["held_out"]["en"]
    assert zh["bytes_per_token_after"] > zh["bytes_per_token_before"]
    assert en["tokens_after"] == en["tokens_before"]
    base, model = load_model(imported), load_model(out)
    tok = Tokenizer.load(out)
    assert model.cfg.vocab_size == tok.vocab_size == report["vocab_size_after"]
    ids = torch.tensor([Tokenizer.load(imported).encode(english[0][:400])])
    with torch.no_grad():
        assert torch.equal(model(ids)[..., :49152], base(ids))
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf(tang[1][0], add_special_tokens=False)["input_ids"] == tok.encode(tang[1][0])


def _fails(args: list[str], capsys, match: str) -> None:
    capsys.readouterr()  # only the command's own output: not what building fixtures printed
    assert main(["tokenizer", "extend", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


@pytest.mark.slow
def test_cli_extend_bad_input_leaves_nothing(
    imported, tiny_tokenizer, tiny_model, tmp_path, capsys
):
    out = tmp_path / "out"
    model = ["--model", str(imported), "--out", str(out)]
    (tmp_path / "empty.txt").write_text("\n\n")
    _fails([*model, "--add", str(tmp_path / "empty.txt")], capsys, "is empty")
    (tmp_path / "have.txt").write_text("the\n中国\n")
    _fails([*model, "--add", str(tmp_path / "have.txt")], capsys, "already in the vocabulary")
    (tmp_path / "twice.txt").write_text("龘\n龘\n")
    _fails([*model, "--add", str(tmp_path / "twice.txt")], capsys, "listed twice")
    (tmp_path / "split.txt").write_text("hello world\n")
    _fails([*model, "--add", str(tmp_path / "split.txt")], capsys, "several pre-tokens")
    (tmp_path / "english.txt").write_text("The cat sat.\n")
    _fails([*model, "--from-corpus", str(tmp_path / "english.txt")], capsys, "nothing to add")
    for kind in ("char", "wordpiece"):
        tok = tiny_tokenizer(kind)
        save_model(tiny_model("llama", vocab_size=tok.vocab_size), tmp_path / kind, tok)
        other = ["--model", str(tmp_path / kind), "--out", str(out)]
        _fails([*other, "--add", str(tmp_path / "twice.txt")], capsys, "byte-level BPE")
    assert not out.exists()
    out.mkdir()
    (out / "x").write_text("keep")
    (tmp_path / "one.txt").write_text("龘\n")
    _fails([*model, "--add", str(tmp_path / "one.txt")], capsys, "already exists")
    assert [p.name for p in out.iterdir()] == ["x"]
    with pytest.raises(ValueError, match="byte-level BPE"):
        check_extendable(tiny_tokenizer("char"))


@pytest.mark.slow
def test_real_smollm2_extended_keeps_english_logits(smollm2_hf, tang, english, tmp_path):
    from zerolm.transforms.resize import extend_model

    base_dir, out = tmp_path / "smol", tmp_path / "smol-zh"
    base_model = import_hf(smollm2_hf, base_dir)
    base = Tokenizer.load(base_dir)
    ext = extend_model(base_dir, out, choose_tokens(base, *han_counts(tang[0]), 1000))
    model, tok = load_model(out), Tokenizer.load(out)
    assert model.cfg.vocab_size == tok.vocab_size == 49152 + 1000 + len(ext.intermediate)
    ids = torch.tensor([base.encode(english[1][:300])])
    assert tok.encode(english[1][:300]) == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids)[..., :49152], base_model(ids))
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for text in tang[1][:50]:
        assert hf(text)["input_ids"] == tok.completion_ids([text])[0]
