"""The `zerolm` command as a user runs it: a real subprocess, real files."""

import json
import subprocess
import sys

import pytest


def zerolm(*args, cwd=None, input=None):
    return subprocess.run(
        [sys.executable, "-m", "zerolm", *map(str, args)],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "poems.txt").write_text(
        "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n\n"
        "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n\n"
        "To be, or not to be, that is the question.\n\nAll the world's a stage.\n",
        encoding="utf-8",
    )
    r = zerolm(
        "prepare",
        "poems.txt",
        "--out",
        "run",
        "--quiet",
        "--data.txt_unit=paragraph",
        "--data.val_fraction=0.3",
        "--tokenizer.vocab_size=300",
        "--tokenizer.min_frequency=1",
        cwd=root,
    )
    assert r.returncode == 0, r.stderr
    assert "documents: read 4, kept 4" in r.stderr
    return root / "run"


def test_encode_decode_round_trip(run_dir):
    text = "举头望明月 — and a stage! 🎉"
    enc = zerolm("tokenizer", "encode", "--tokenizer", run_dir / "tokenizer", text)
    assert enc.returncode == 0, enc.stderr
    ids = enc.stdout.split()
    assert all(i.isdigit() for i in ids)
    dec = zerolm("tokenizer", "decode", "--tokenizer", run_dir / "tokenizer", *ids)
    assert dec.stdout == text + "\n"
    via_stdin = zerolm("tokenizer", "encode", "--tokenizer", run_dir / "tokenizer", input=text)
    assert via_stdin.stdout.split() == ids
    tokens = zerolm("tokenizer", "encode", "--tokens", "--tokenizer", run_dir / "tokenizer", "明月")
    # byte-level BPE spelling of 明 and 月 (one token or two: qwen2 keeps the word whole)
    assert "".join(json.loads(tokens.stdout)) == "æĺİæľĪ"


def test_resolved_config_written(run_dir):
    text = (run_dir / "config.toml").read_text()
    assert 'txt_unit = "paragraph"' in text and "vocab_size = 300" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare", "missing.txt"], "input path 'missing.txt' does not exist"),
        (
            ["prepare", "--corpus", "nope"],
            "unknown corpus 'nope'; bundled corpora: tang, shakespeare",
        ),
        (["prepare", "--data.val_fration=0.1"], "Did you mean 'val_fraction'"),
        (["prepare"], "no input"),
        (["tokenizer", "decode", "--tokenizer", "run/tokenizer", "99999"], "out of range"),
        (["tokenizer", "decode", "--tokenizer", "run/tokenizer", "abc"], "integer token ids"),
        (["tokenizer", "encode", "--tokenizer", "nowhere", "x"], "no tokenizer at 'nowhere'"),
    ],
)
def test_errors_are_one_clear_line(run_dir, args, message):
    r = zerolm(*args, cwd=run_dir.parent)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_help_and_corpora():
    r = zerolm("--help")
    assert r.returncode == 0 and "prepare" in r.stdout and "speedrun" in r.stdout
    r = zerolm("corpora")
    assert "tang" in r.stdout and "shakespeare" in r.stdout
    r = zerolm("config", "--data.corpus=tang", "--tokenizer.kind=char")
    assert 'corpus = ["tang"]' in r.stdout and 'kind = "char"' in r.stdout


def test_override_value_after_a_space_is_not_an_input_file():
    r = zerolm("config", "--out_dir", "elsewhere", "--data.corpus", "tang", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert (
        'out_dir = "elsewhere"' in r.stdout and "seed = 7" in r.stdout and "inputs = []" in r.stdout
    )


def test_config_prints_every_section_and_finds_recipes_by_name():
    r = zerolm("config", "--config", "speedrun", "--sample.temperature=0", "--serve.port", "9")
    assert r.returncode == 0, r.stderr
    for section in ("data", "train", "sample", "serve", "inspect", "translate"):
        assert f"\n[{section}]\n" in r.stdout
    assert 'out_dir = "runs/speedrun"' in r.stdout  # the bundled recipe's
    assert "temperature = 0.0" in r.stdout and "port = 9" in r.stdout
    r = zerolm("config", "--config", "nope")
    assert r.returncode == 2 and "bundled recipe: bert-tang" in r.stderr
