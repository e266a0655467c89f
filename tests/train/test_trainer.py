import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from zerolm.config import TrainConfig
from zerolm.train.batches import Stream
from zerolm.train.losses import lm_loss
from zerolm.train.optim import lr_at, param_groups
from zerolm.train.trainer import Trainer


def test_schedules_by_hand():
    cos = TrainConfig(steps=110, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(60, cos) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cos) == pytest.approx(0.1)
    wsd = TrainConfig(
        steps=100, lr=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2
    )
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(80, wsd) == pytest.approx(0.95) and lr_at(99, wsd) == pytest.approx(0.0)
    assert lr_at(50, TrainConfig(schedule="constant", lr=0.3, warmup_steps=5)) == 0.3


def test_weight_decay_only_on_matrices(tiny_model):
    model = tiny_model("gpt2", 20, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    assert no_decay["weight_decay"] == 0.0


@pytest.fixture
def new_model(tiny_model):
    """A fresh model per call (the tests train it): llama, vocab 50, window 16, seed 3."""
    return lambda: tiny_model("llama", 50, seed=3, max_seq_len=16)


def test_grad_accumulation_equals_big_batch(tmp_path, new_model):
    data = torch.randint(0, 50, (8, 17), generator=torch.Generator().manual_seed(0))
    big = [(data[:, :-1], data[:, 1:])]
    small = [(data[:4, :-1], data[:4, 1:]), (data[4:, :-1], data[4:, 1:])]
    results = []
    for batches, accum in ((big, 1), (small, 2)):
        model = new_model()
        cfg = TrainConfig(
            steps=1, grad_accum=accum, batch_size=8 // accum, precision="fp32", warmup_steps=1
        )
        Trainer(
            model,
            cfg,
            tmp_path / str(accum),
            batches=Stream(batches),
            loss_fn=lm_loss,
            progress=False,
        ).train_step()
        results.append(model.state_dict())
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-6), k


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, precision, new_model):
    """train.compile compiles the whole loss function: same losses and updates as eager mode."""
    data = torch.randint(0, 50, (3, 4, 17), generator=torch.Generator().manual_seed(0))
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = new_model()
        cfg = TrainConfig(steps=3, precision=precision, warmup_steps=1, compile=compiled)
        trainer = Trainer(
            model,
            cfg,
            tmp_path / str(compiled),
            batches=Stream(batches),
            loss_fn=lm_loss,
            progress=False,
        )
        runs.append(([trainer.train_step()["loss"] for _ in batches], model.state_dict()))
    tol = 1e-5 if precision == "fp32" else 2e-2  # bf16: fused kernels round differently
    assert runs[1][0] == pytest.approx(runs[0][0], abs=tol)
    for k, v in runs[0][1].items():
        assert torch.allclose(runs[1][1][k], v, atol=10 * tol), k


@pytest.mark.slow
def test_failed_compile_falls_back_to_eager(tmp_path, caplog, new_model):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    data = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=1, precision="fp32", warmup_steps=1, compile=True)
    trainer = Trainer(
        new_model(),
        cfg,
        tmp_path,
        batches=Stream([(data[:, :-1], data[:, 1:])] * 2),
        loss_fn=lm_loss,
        progress=False,
    )
    # config.patch restores both settings as they were (monkeypatch's undo deleted the cache key:
    # issue 18)
    with inductor_config.patch({"fx_graph_cache": False, "cpp.cxx": ("no-such-c++-compiler",)}):
        assert math.isfinite(trainer.train_step()["loss"])
    assert trainer.train_loss is lm_loss and "training continues in eager mode" in caplog.text
    torch._dynamo.reset()  # no graph compiled under the broken compiler setting outlives the test


def test_loss_decreases(tiny_corpus, tiny_model):
    from zerolm.data.loader import TokenBatches

    model = tiny_model("gpt2", 300, max_seq_len=32)
    batches = TokenBatches(tiny_corpus / "run" / "shards", batch_size=8, seq_len=32)
    cfg = TrainConfig(
        steps=60,
        lr=3e-3,
        warmup_steps=5,
        precision="fp32",
        eval_every=1000,
        ckpt_every=1000,
        log_every=1000,
    )
    trainer = Trainer(
        model, cfg, tiny_corpus / "t_loss", batches=batches, loss_fn=lm_loss, progress=False
    )
    trainer.fit()
    rows = [
        json.loads(x) for x in (tiny_corpus / "t_loss" / "train_log.jsonl").read_text().splitlines()
    ]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)


# ---------------------------------------------------------------- exact resume, in real processes


def _pretrain_cmd(root, out, steps, extra=()):
    args = [
        sys.executable,
        "-m",
        "zerolm",
        "pretrain",
        str(root / "docs.jsonl"),
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
        "--model.dropout=0.1",
        f"--train.steps={steps}",
        "--train.batch_size=4",
        "--train.precision=fp32",
        "--train.eval_every=50",
        "--train.eval_batches=2",
        "--train.ckpt_every=25",
        "--train.log_every=1000",
        "--train.threads=1",
        "--train.keep_checkpoints=3",
        *extra,
    ]
    return args


def _losses(out):
    by_step = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row["loss"]  # a resumed run rewrites the steps after its checkpoint
    return [by_step[s] for s in sorted(by_step)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus):
    out = tiny_corpus / "full"
    r = subprocess.run(
        _pretrain_cmd(tiny_corpus, out, 150), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    return _losses(out)


def _wait_for(path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, "training finished before it could be interrupted"
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["kill", "ctrl-c", "sigterm", "double-ctrl-c"])
@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(tiny_corpus, uninterrupted, how):
    out = tiny_corpus / f"resume-{how}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _pretrain_cmd(tiny_corpus, out, 150),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _wait_for(out / "checkpoints" / "step-0000050", proc)
    proc.send_signal({"kill": signal.SIGKILL, "sigterm": signal.SIGTERM}.get(how, signal.SIGINT))
    if (
        how == "double-ctrl-c"
    ):  # the second lands mid-step or mid-save: neither may leave an inconsistent checkpoint
        time.sleep(0.003)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if how != "kill":  # SIGTERM is handled like Ctrl-C: the step finishes and a checkpoint is saved
        # (a second Ctrl-C 3 ms later can land inside the first one's handler, before its message
        # is written: then it aborts at once, which the checks below cover as well)
        said = "saving a checkpoint" in err or (how == "double-ctrl-c" and "aborted at step" in err)
        assert proc.returncode == 130 and said, err
    steps = sorted(
        int(p.name[5:]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")
    )
    assert 50 <= steps[-1] < 150
    refused = subprocess.run(
        _pretrain_cmd(tiny_corpus, out, 150), capture_output=True, text=True, timeout=600
    )
    assert refused.returncode == 2 and "--train.resume=true" in refused.stderr
    r = subprocess.run(
        _pretrain_cmd(tiny_corpus, out, 150, ["--resume"]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert _losses(out) == uninterrupted  # bit-identical, step by step


def test_every_zero_means_only_at_the_last_step(tmp_path, new_model):
    data = torch.randint(0, 50, (5, 4, 17), generator=torch.Generator().manual_seed(0))
    evals = []
    cfg = TrainConfig(
        steps=5, precision="fp32", warmup_steps=1, eval_every=0, ckpt_every=0, log_every=0
    )
    trainer = Trainer(
        new_model(),
        cfg,
        tmp_path,
        batches=Stream([(d[:, :-1], d[:, 1:]) for d in data]),
        loss_fn=lm_loss,
        eval_fn=lambda m: evals.append(1) or {"val_loss": 1.0},
        progress=False,
    )
    trainer.fit()
    assert evals == [1]
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-0000005"]
