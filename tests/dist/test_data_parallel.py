"""DDP and FSDP2 on 2 real gloo processes (torchrun, OMP_NUM_THREADS=1 each) against one process:
the same losses and parameters (fp32), and the CLI's stages under torchrun."""

import json
import shutil
from pathlib import Path

import dist_cases
import pytest
import torch
from launch import torchrun

from zerolm.model import load_model

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Every case of dist_cases.py in one 2-process job (rank 0's results)."""
    out = tmp_path_factory.mktemp("job")
    r = torchrun(str(ROOT / "tests" / "dist" / "dist_cases.py"), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out / "results.pt", weights_only=False)


def one_process(tmp_path, **kw) -> dict:
    result = dist_cases.train(tmp_path, **kw)
    assert not torch.distributed.is_initialized()  # a plain Trainer sets up nothing
    return result


def assert_same(a: dict, b: dict, tol: float) -> None:
    assert a["losses"] == pytest.approx(b["losses"], abs=tol, rel=0)
    for k, v in a["state"].items():
        assert torch.allclose(v, b["state"][k], atol=tol, rtol=0), (
            k,
            (v - b["state"][k]).abs().max(),
        )


def test_a_ddp_step_equals_one_process_on_the_concatenated_batch(job, tmp_path):
    # masked rows count different numbers of tokens on the two ranks: the loss is weighted by them
    ref = one_process(tmp_path, **dist_cases.CASES["ddp_masked"])
    assert_same(job["ddp_masked"], ref, 1e-6)
    assert ref["losses"][0] != ref["losses"][-1]  # it trained


def test_fsdp2_gives_the_losses_of_ddp_over_20_steps(job):
    ddp, fsdp = job["ddp_20"], job["fsdp_20"]
    assert len(fsdp["losses"]) == 20
    assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5, rel=0)
    assert_same(fsdp, ddp, 1e-5)  # the gathered full weights too


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_2_ranks_x_2_micro_steps_equals_1_rank_x_4(job, tmp_path, strategy):
    ref = one_process(tmp_path, steps=3, rows=8, accum=4)
    assert_same(job["accum_2x2" if strategy == "ddp" else "fsdp_accum_2x2"], ref, 1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_trains_only_the_adapters_under_ddp_and_fsdp2(job, tmp_path, strategy):
    ref = one_process(tmp_path, **dist_cases.CASES["ddp_lora"])
    run = job[f"{strategy}_lora"]
    assert_same(run, ref, 1e-6)
    base = dist_cases.tiny_llama().state_dict()
    adapters = [k for k in run["state"] if "lora_" in k]
    assert adapters and all(
        torch.equal(v, base[k.replace(".base.", ".")])
        for k, v in run["state"].items()
        if k not in adapters
    )  # every frozen weight as it was
    assert all(run["state"][k].abs().max() > 0 for k in adapters if "lora_B" in k)  # B left zero


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_compiled_loss_trains_under_ddp_and_fsdp2(job, tmp_path, strategy):
    run = job[f"{strategy}_compiled"]
    assert run["compiled"]  # compiled on the ranks, not fallen back to eager
    ref = one_process(tmp_path, **dist_cases.CASES["ddp_compiled"])
    assert ref["compiled"]
    assert_same(run, ref, 1e-5)
    eager = one_process(
        tmp_path / "eager", **{**dist_cases.CASES["ddp_compiled"], "compile": False}
    )
    assert_same(run, eager, 1e-5)


def test_ranks_with_different_configs_stop_at_the_start(job):
    assert job["mismatch"].startswith("rank 1 resolved a different config from rank 0's")
    assert "seed = 0" in job["mismatch"] and "seed = 1" in job["mismatch"]


# ---------------------------------------------------------------- the CLI under torchrun


def pretrain_args(docs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "zerolm",
        "pretrain",
        str(docs),
        "--out",
        str(out),
        "--quiet",
        "--tokenizer.vocab_size=300",
        "--tokenizer.min_frequency=1",
        "--model.preset=llama",
        "--model.d_model=32",
        "--model.n_layers=2",
        "--model.n_heads=4",
        "--model.max_seq_len=32",
        "--train.steps=10",
        "--train.batch_size=4",
        "--train.precision=fp32",
        "--train.eval_every=5",
        "--train.eval_batches=2",
        "--train.ckpt_every=5",
        "--train.log_every=5",
        *extra,
    ]


@pytest.fixture(scope="module")
def pretrained(tiny_corpus):
    out = tiny_corpus / "dist-pretrain"
    r = torchrun(*pretrain_args(tiny_corpus / "docs.jsonl", out, "--dist.strategy", "ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_torchrun_pretrain_writes_one_log_and_one_config_from_rank_0(pretrained):
    out, r = pretrained
    assert sorted(p.name for p in out.rglob("train_log*")) == ["train_log.jsonl"]
    assert sorted(p.name for p in out.rglob("*.toml")) == ["config.toml"]
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 11))
    assert all(row["tokens"] == 4 * 32 for row in rows)  # the whole job's: 2 ranks x 2 rows
    assert r.stderr.count("distributed: ddp over 2 processes") == 1  # rank 1 logs no info lines
    assert r.stderr.count("step     10/10") == 1
    assert load_model(out / "model").cfg.d_model == 32
    assert [p.name for p in (out / "checkpoints").iterdir()] != []


def test_torchrun_sft_with_fsdp_saves_an_ordinary_model(pretrained, tmp_path):
    base = pretrained[0] / "model"
    chats = tmp_path / "chats.jsonl"
    turns = [("abc de", "fgh ij"), ("hi jab", "cad bee fig"), ("dab", "a b c"), ("gag", "jig")]
    chats.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for u, a in turns * 2
        )
    )
    out = tmp_path / "sft"
    r = torchrun(
        *("-m", "zerolm", "sft", "--model", str(base), "--out", str(out), "--quiet"),
        f"--sft.data={chats}",
        "--sft.val_fraction=0",
        "--train.steps=4",
        "--train.batch_size=2",
        "--train.precision=fp32",
        "--dist.strategy=fsdp",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed: fsdp over 2 processes" in r.stderr
    assert sorted(p.name for p in (out / "model").glob("*.safetensors")) == ["model.safetensors"]
    tuned, before = load_model(out / "model").state_dict(), load_model(base).state_dict()
    assert tuned.keys() == before.keys()
    assert any(not torch.equal(tuned[k], before[k]) for k in tuned)  # trained, and gathered whole


def test_a_batch_the_world_size_does_not_divide_is_a_clear_error(tiny_corpus, tmp_path):
    r = torchrun(*pretrain_args(tiny_corpus / "docs.jsonl", tmp_path / "x", "--train.batch_size=3"))
    assert r.returncode != 0
    assert (
        "zerolm: error: train.batch_size 3 (sequences per micro-batch, all ranks together) is not "
        "divisible by the world size 2: use --train.batch_size=4"
    ) in r.stderr
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_plain_pretrain_resumes_a_torchrun_checkpoint_with_its_losses(pretrained, tmp_path):
    # the real pretrain loader's position, in a DCP checkpoint of 2 ranks, resumed by 1 process
    src, _ = pretrained
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    shutil.rmtree(out / "checkpoints" / "step-0000010")
    shutil.rmtree(out / "model")
    log = out / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 5))
    assert (out / "checkpoints" / "step-0000005" / ".metadata").is_file()  # sharded
    from zerolm.cli import main

    assert main(pretrain_args(src.parent / "docs.jsonl", out, "--train.resume=true")[2:]) == 0
    resumed = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in rows], abs=1e-6, rel=0)
    assert [r["loss"] for r in rows][5] != [r["loss"] for r in rows][6]


def torchrun_align(stage: str, base: Path, out: Path, *extra: str):
    """`torchrun ... zerolm STAGE` for 4 steps on 8 toy preference pairs (a quarter held out)."""
    prefs = out.parent / "prefs.jsonl"
    rows = [{"prompt": f"abc {w}", "chosen": f"de {w} fgh", "rejected": "ij"} for w in "abcdefgh"]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return torchrun(
        *("-m", "zerolm", stage, "--model", str(base), "--out", str(out), "--quiet"),
        *(f"--align.data={prefs}", "--align.val_fraction=0.25", "--train.steps=4"),
        *("--train.batch_size=2", "--train.precision=fp32", *extra),
    )


def test_torchrun_dpo_with_lora_under_fsdp_saves_adapters_and_a_model(pretrained, tmp_path):
    # DPO's batches are B chosen then B rejected rows: each rank takes its share of both halves
    out = tmp_path / "dpo"
    r = torchrun_align("dpo", pretrained[0] / "model", out, "--lora.rank=4", "--dist.strategy=fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed: fsdp over 2 processes" in r.stderr
    assert (out / "adapters.safetensors").is_file()
    assert load_model(out / "model").cfg.d_model == 32


def test_fsdp2_bf16_computes_in_bf16_and_keeps_fp32_master_weights(job, tmp_path):
    # the mixed-precision policy: bf16 gathered parameters, fp32 shards for AdamW and reductions
    run = job["fsdp_bf16"]
    assert run["master_dtype"] == "torch.float32"
    assert all(v.dtype == torch.float32 for v in run["state"].values())
    case = {k: v for k, v in dist_cases.CASES["fsdp_bf16"].items() if k != "strategy"}
    bf16 = one_process(tmp_path / "bf16", **case)
    fp32 = one_process(tmp_path / "fp32", **{**case, "precision": "fp32"})
    assert run["losses"] != pytest.approx(fp32["losses"], abs=1e-5, rel=0)  # bf16 was used
    assert run["losses"] == pytest.approx(fp32["losses"], abs=1e-3, rel=0)
    assert run["losses"] == pytest.approx(bf16["losses"], abs=1e-3, rel=0)
    assert run["losses"][-1] < run["losses"][0]


def test_poem_pairs_are_sampled_half_by_each_rank_and_equal_one_process(
    tmp_path, tiny_model, tiny_tokenizer
):
    import pairs_case

    from zerolm.model import save_model

    text = [r["messages"][-1]["content"] for r in pairs_case.requests()] * 10
    tok = tiny_tokenizer("bpe", text, vocab_size=300)
    save_model(
        tiny_model("llama", tok.vocab_size, d_model=32, max_seq_len=128), tmp_path / "m", tok
    )
    r = torchrun(str(ROOT / "tests" / "dist" / "pairs_case.py"), str(tmp_path / "m"), str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    run = torch.load(tmp_path / "pairs.pt", weights_only=False)
    ref, counts, calls = pairs_case.sample(tmp_path / "m")
    assert calls == 3 and run["calls"] == [(calls + 1) // 2, calls // 2]
    assert (
        ref and run["pairs"] == ref and run["counts"] == counts and counts["samples"] == 2 * calls
    )


def test_torchrun_reward_under_ddp_trains_with_its_unused_lm_head_frozen(pretrained, tmp_path):
    # the reward reads the body's hidden states, never its (untied) LM head: frozen, as DDP needs
    out = tmp_path / "rm"
    r = torchrun_align("reward", pretrained[0] / "model", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed: ddp over 2 processes" in r.stderr
    before, after = load_model(pretrained[0] / "model"), load_model(out / "model")
    assert torch.equal(before.lm_head.weight, after.lm_head.weight)
    assert not torch.equal(before.blocks[0].attn.q.weight, after.blocks[0].attn.q.weight)


def test_torchrun_classify_under_ddp_trains_with_the_pretraining_heads_frozen(
    tmp_path, tiny_model, tiny_tokenizer
):
    # the classifier never runs bert's mlm and nsp heads: frozen, as DDP needs
    from zerolm.model import save_model

    tok = tiny_tokenizer("wordpiece", ["海浪潮波鱼舟山峰岭石松云之而其"], vocab_size=100)
    save_model(tiny_model("bert", tok.vocab_size, n_heads=2, max_seq_len=24), tmp_path / "b", tok)
    rows = [{"text": t * 3, "label": t} for t in "海浪潮山峰岭" * 8]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "cls"
    r = torchrun(
        *("-m", "zerolm", "finetune-classify", "--model", str(tmp_path / "b"), "--out", str(out)),
        *("--quiet", f"--classify.data={data}", "--train.steps=4", "--train.batch_size=4"),
        "--train.precision=fp32",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed: ddp over 2 processes" in r.stderr
    before, after = load_model(tmp_path / "b"), load_model(out / "model")
    assert torch.equal(before.nsp.weight, after.nsp.weight)
    assert not torch.equal(before.blocks[0].attn.q.weight, after.blocks[0].attn.q.weight)
