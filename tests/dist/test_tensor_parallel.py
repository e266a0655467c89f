"""Tensor-parallel decoding on 2 real gloo processes (torchrun, OMP_NUM_THREADS=1 each) against one
process: the same greedy tokens and logits within 1e-5 (fp32) for llama with GQA and gpt2, through
the engine and through `zerolm generate --tp 2`; and the bad inputs' errors."""

import pytest
import torch
import tp_cases
from test_data_parallel import ROOT, torchrun

from zerolm.cli import main as zerolm
from zerolm.dist.tensor import check_divisible
from zerolm.model import save_model

pytestmark = [pytest.mark.dist, pytest.mark.slow]
TOL = 1e-5  # fp32: the row-wise all-reduce sums the two halves of o's and down's products


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Every case of tp_cases.py in one 2-process job (rank 0's results)."""
    out = tmp_path_factory.mktemp("tp")
    r = torchrun(str(ROOT / "tests" / "dist" / "tp_cases.py"), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out / "results.pt", weights_only=False)


@pytest.mark.parametrize("name", list(tp_cases.MODELS))
def test_tp2_greedy_decode_equals_one_process(job, name):
    ref, tp = tp_cases.decode(tp_cases.model(name)), job[name]
    assert tp["tokens"] == ref["tokens"]
    assert len({t for row in ref["tokens"] for t in row}) > 2  # not one repeated token
    assert (tp["logits"] - ref["logits"]).abs().max() < TOL
    # each rank's cache holds its own half of the kv heads
    slots, kv, span, dh = ref["cache"]
    assert tp["cache"] == (slots, kv // 2, span, dh)


def test_tp2_seeded_sampling_draws_the_tokens_of_one_process(job):
    assert job["sampled"] == tp_cases.sample(tp_cases.model("llama_gqa"))


def test_shards_that_split_a_head_or_a_quantized_model_are_refused(job):
    assert job["odd_heads"].startswith("--tp 2 does not divide the model's n_heads=3, n_kv_heads=3")
    assert "n_kv_heads=1" in job["one_kv_head"] and "use --tp in [1]" in job["one_kv_head"]
    assert "float models only" in job["quantized"] and "zerolm quantize" in job["quantized"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny llama with GQA and a BPE tokenizer (weights as tp_cases draws them)."""
    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tp_cases.VOCAB, vocab = tok.vocab_size, tp_cases.VOCAB
    try:
        m = tp_cases.model("llama_gqa")
    finally:
        tp_cases.VOCAB = vocab
    out = tmp_path_factory.mktemp("tpm") / "model"
    save_model(m, out, tok)
    return out


def test_cli_generate_tp2_under_torchrun_equals_one_process(model_dir, capfd):
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "10", "--temperature", "0"]
    args += ["Hello there", "The quick"]
    assert zerolm(args) == 0  # the reference: one process (this one)
    one = capfd.readouterr().out
    r = torchrun("-m", "zerolm", *args, "--tp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0 prints, rank 1 does not; text=True reads "\r" in the random tokens' text as "\n"
    assert r.stdout == one.replace("\r\n", "\n").replace("\r", "\n")
    assert one.count("---") == 2 and len(one) > 40


def test_tp_without_torchrun_or_with_another_world_size_names_the_fix(
    model_dir, capsys, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert zerolm(["generate", "--model", str(model_dir), "--tp", "2", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--tp 2 needs one process per rank: run `torchrun --nproc-per-node 2" in err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert zerolm(["generate", "--model", str(model_dir), "--tp", "2", "hi"]) == 2
    assert "WORLD_SIZE=4: start torchrun with --nproc-per-node 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert zerolm(["generate", "--model", str(model_dir), "--tp", "2", "--compile", "hi"]) == 2
    assert "--compile with --tp is not supported" in capsys.readouterr().err
    assert zerolm(["generate", "--model", str(model_dir), "hi"]) == 2  # torchrun without --tp
    assert (
        "WORLD_SIZE=2 each process would decode on its own: pass --tp 2" in capsys.readouterr().err
    )


def test_serve_tp_without_torchrun_names_the_fix(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert zerolm(["serve", str(model_dir), "--tp", "2"]) == 2
    assert "--tp 2 needs one process per rank: run `torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # two servers on one port otherwise
    assert zerolm(["serve", str(model_dir)]) == 2
    assert "pass --tp 2" in capsys.readouterr().err


def test_the_divisibility_error_names_both_head_counts():
    from zerolm.config import ModelConfig

    cfg = ModelConfig(n_heads=8, n_kv_heads=2, d_ff=64)
    check_divisible(cfg, 2)
    with pytest.raises(
        ValueError, match=r"--tp 4 does not divide the model's n_kv_heads=2 \(n_heads=8"
    ):
        check_divisible(cfg, 4)
