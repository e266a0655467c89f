"""The model commands as a user runs them: pretrain -> generate / inspect / import, real
processes."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test runs the CLI in subprocesses


def zerolm(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "zerolm", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clim")
    poems = [
        "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
        "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
        "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
        "千山鸟飞绝，万径人踪灭。\n孤舟蓑笠翁，独钓寒江雪。",
    ]
    (root / "p.jsonl").write_text(
        "".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in poems * 30)
    )
    r = zerolm(
        "pretrain",
        root / "p.jsonl",
        "--out",
        root / "run",
        "--quiet",
        "--data.dedup=none",
        "--tokenizer.kind=char",
        "--tokenizer.vocab_size=400",
        "--tokenizer.min_frequency=1",
        "--model.d_model=32",
        "--model.n_layers=2",
        "--model.n_heads=4",
        "--model.max_seq_len=32",
        "--train.steps=40",
        "--train.batch_size=8",
        "--train.eval_every=20",
        "--train.lr=1e-2",
    )
    assert r.returncode == 0, r.stderr
    assert "final validation (whole split)" in r.stderr and "sample:" in r.stderr
    return root / "run" / "model"


def test_generate_batch_and_stream_agree(model_dir):
    r = zerolm(
        "generate", "--model", model_dir, "--seed", "7", "--max-new-tokens", "12", "明月", "春眠"
    )
    assert r.returncode == 0, r.stderr
    outs = r.stdout.split("\n---\n")
    assert outs[0].startswith("明月") and outs[1].startswith("春眠")
    s = zerolm(
        "generate",
        "--model",
        model_dir,
        "--seed",
        "7",
        "--max-new-tokens",
        "12",
        "--stream",
        "明月",
    )
    assert s.returncode == 0, s.stderr
    single = zerolm(
        "generate", "--model", model_dir, "--seed", "7", "--max-new-tokens", "12", "明月"
    )
    assert s.stdout == single.stdout


def test_generate_greedy_with_stop_string(model_dir):
    r = zerolm(
        "generate",
        "--model",
        model_dir,
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
        "--stop",
        "。",
        "床前",
    )
    assert r.returncode == 0, r.stderr
    assert "。" not in r.stdout and r.stdout.startswith("床前")


def test_short_flags_are_aliases_of_sample_keys(model_dir, tmp_path):
    short = ["--temperature", "0", "--max-new-tokens", "10", "--stop", "。", "床前"]
    dotted = ["--sample.temperature=0", "--sample.max_new_tokens", "10", "--sample.stop=。", "床前"]
    (tmp_path / "greedy.toml").write_text("[sample]\ntemperature = 0.0\nmax_new_tokens = 10\n")
    recipe = ["--config", tmp_path / "greedy.toml", "--stop", "。", "床前"]
    outs = [zerolm("generate", "--model", model_dir, *a) for a in (short, dotted, recipe)]
    assert all(r.returncode == 0 for r in outs), [r.stderr for r in outs]
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout


def test_generate_errors(model_dir):
    r = zerolm("generate", "--model", model_dir, "ÆØÅ")
    assert r.returncode == 2 and "never saw in training" in r.stderr
    r = zerolm("generate", "--model", model_dir, "--top-p", "1.5", "明月")
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr
    r = zerolm("generate", "--model", model_dir.parent / "nope", "x")
    assert r.returncode == 2 and "no model at" in r.stderr


def test_inspect(model_dir):
    r = zerolm("inspect", model_dir, "--json")
    a = json.loads(r.stdout)
    assert a["estimate_12_d2_N"] == 12 * 32 * 32 * 2
    assert a["total"] == sum(a["parameters"].values())
    assert "12·d²·N" in zerolm("inspect", model_dir).stdout
    short = json.loads(
        zerolm("inspect", model_dir, "--json", "--context", "16", "--batch", "2").stdout
    )
    dotted = zerolm("inspect", model_dir, "--json", "--inspect.context=16", "--inspect.batch=2")
    assert json.loads(dotted.stdout) == short != a


def test_import_hf_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    r = zerolm("import", tmp_path / "hf", "--from", "hf", "--out", tmp_path / "z")
    assert r.returncode == 0, r.stderr
    from zerolm.model import load_model

    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "z")(ids), hf(ids).logits, atol=1e-4)
