"""Issue 18: non-finite losses, checkpoints that must stay good, resume of the same run only,
signals during a save, a full disk, and the leftovers of a kill -9."""

import dataclasses
import errno
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from zerolm.config import TrainConfig, load_config
from zerolm.train import checkpoint
from zerolm.train.batches import Stream
from zerolm.train.checkpoint import NonFiniteError, list_checkpoints, save_checkpoint
from zerolm.train.losses import LossResult, lm_loss
from zerolm.train.trainer import Trainer


@pytest.fixture
def new_model(tiny_model):
    """A fresh model per call (the tests train it): llama, vocab 50, window 16, seed 3."""
    return lambda: tiny_model("llama", 50, seed=3, max_seq_len=16)


def _batches(n, seed=0):
    data = torch.randint(0, 50, (n, 4, 17), generator=torch.Generator().manual_seed(seed))
    return [(d[:, :-1], d[:, 1:]) for d in data]


def _poisoned(bad_calls):
    """lm_loss, made NaN at the given (1-based) calls: fault injection standing in for an
    overflow."""
    calls = [0]

    def loss(model, batch):
        calls[0] += 1
        out = lm_loss(model, batch)
        return LossResult(out.loss * math.nan if calls[0] in bad_calls else out.loss, out.n)

    return loss


def _strict_rows(path):
    def refuse(name):
        raise AssertionError(f"bare {name} in a JSONL row")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _all_finite(out):
    found = list_checkpoints(out)
    return found and all(
        torch.isfinite(t).all() for p in found for t in load_file(p / "model.safetensors").values()
    )


def _cfg(**kw):
    return TrainConfig(
        **{
            "steps": 30,
            "precision": "fp32",
            "warmup_steps": 1,
            "eval_every": 0,
            "log_every": 0,
            "ckpt_every": 5,
            "keep_checkpoints": 2,
            **kw,
        }
    )


def test_nan_once_is_skipped_and_every_checkpoint_stays_finite(tmp_path, new_model):
    trainer = Trainer(
        new_model(),
        _cfg(),
        tmp_path,
        batches=Stream(_batches(30)),
        loss_fn=_poisoned({8}),
        eval_fn=lambda m: {"val_loss": math.nan},
        progress=False,
    )
    row = trainer.fit()
    rows = _strict_rows(tmp_path / "train_log.jsonl")  # NaN -> null: every row is strict JSON
    assert [r["step"] for r in rows] == list(range(1, 31)) and row["step"] == 30
    assert rows[7]["loss"] is None and rows[7]["skipped"] is True
    assert all(r["loss"] is not None and "skipped" not in r for r in rows if r["step"] != 8)
    assert rows[-1]["val_loss"] is None
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-0000025",
        "step-0000030",
    ] and _all_finite(tmp_path)


def test_skipped_step_under_grad_accumulation_changes_nothing(tmp_path, new_model):
    """The check runs once the micro-batches are accumulated: one bad micro-batch skips the whole
    update."""
    model = new_model()
    trainer = Trainer(
        model,
        _cfg(grad_accum=2),
        tmp_path,
        batches=Stream(_batches(4)),
        loss_fn=_poisoned({2}),
        progress=False,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    row = trainer.train_step()
    assert row["skipped"] and trainer.step == 1 and trainer.optimizer.state == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert (
        not trainer.train_step().get("skipped") and trainer.step == 2
    )  # the next batches are fine: trained on


def test_nan_that_persists_stops_within_the_limit_naming_the_last_good_checkpoint(
    tmp_path, new_model
):
    trainer = Trainer(
        new_model(),
        _cfg(nonfinite_limit=5),
        tmp_path,
        batches=Stream(_batches(30)),
        loss_fn=_poisoned(set(range(8, 31))),
        progress=False,
    )
    with pytest.raises(NonFiniteError) as e:
        trainer.fit()
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg and trainer.step == 12
    assert (
        "5 consecutive steps (steps 8-12" in msg
        and str(tmp_path / "checkpoints" / "step-0000005") in msg
    )
    # step 10's checkpoint was due inside the streak: not written, so the last good one is the last
    # finite step's
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000005"] and _all_finite(
        tmp_path
    )


def test_nonfinite_stop_policy_stops_at_the_first_bad_step(tmp_path, new_model):
    trainer = Trainer(
        new_model(),
        _cfg(nonfinite="stop"),
        tmp_path,
        batches=Stream(_batches(30)),
        loss_fn=_poisoned({3}),
        progress=False,
    )
    with pytest.raises(
        NonFiniteError, match="step 3: non-finite loss nan.*no checkpoint was saved yet"
    ):
        trainer.fit()


def test_rollback_reloads_the_last_checkpoint_at_a_lower_lr(tmp_path, new_model):
    cfg = _cfg(nonfinite="rollback", steps=12, schedule="constant", lr=1e-3)
    trainer = Trainer(
        new_model(),
        cfg,
        tmp_path,
        batches=Stream(_batches(20)),
        loss_fn=_poisoned({8}),
        progress=False,
    )
    trainer.fit()
    rows = _strict_rows(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in rows] == [*range(1, 9), *range(6, 13)]
    assert rows[7]["rolled_back_to"] == 5 and rows[7]["lr_scale"] == 0.5
    assert all(r["lr"] == pytest.approx(5e-4) for r in rows[8:]) and _all_finite(tmp_path)
    state = torch.load(list_checkpoints(tmp_path)[-1] / "state.pt", weights_only=True)
    assert state["lr_scale"] == 0.5 and state["rollbacks"] == 1  # a resume keeps the lowered lr


def test_nonfinite_weights_are_never_saved_and_good_checkpoints_are_kept(tmp_path, new_model):
    model, good = new_model(), new_model()
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        save_checkpoint(tmp_path, step, good, opt, {}, keep=2)
    with torch.no_grad():
        model.norm_f.weight[0] = math.inf
    with pytest.raises(
        NonFiniteError,
        match=r"refusing to save checkpoint step-0000003: non-finite weights in "
        r"norm_f.weight; the last good checkpoint is .*step-0000002",
    ):
        save_checkpoint(tmp_path, 3, model, opt, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000001",
        "step-0000002",
    ]


def test_disk_full_at_a_checkpoint_is_one_clear_line_and_leaves_nothing_partial(
    tmp_path, monkeypatch, new_model
):
    real, calls = checkpoint.save_file, [0]

    def disk_fills(
        state, path, *a, **kw
    ):  # fault injection: the second save hits a full disk mid-write
        calls[0] += 1
        if calls[0] == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(state, path, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", disk_fills)
    trainer = Trainer(
        new_model(),
        _cfg(steps=6, ckpt_every=2),
        tmp_path,
        batches=Stream(_batches(6)),
        loss_fn=lm_loss,
        progress=False,
    )
    with pytest.raises(ValueError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "\n" not in msg and not isinstance(e.value, OSError)
    assert (
        f"could not write checkpoint step-0000004 into {tmp_path / 'checkpoints'}: the disk is full"
        in msg
    )
    assert "step-0000002" in msg
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000002"]


def test_a_partial_save_left_by_kill_9_is_removed_at_the_next_start(tmp_path, new_model):
    root = tmp_path / "checkpoints"
    for name in (".step-0000004.k3j2x1.tmp", ".step-0000002.old-4242"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"\0" * 10)
    (root / "notes").mkdir()  # not ours: left alone
    trainer = Trainer(
        new_model(),
        _cfg(steps=2, ckpt_every=2),
        tmp_path,
        batches=Stream(_batches(2)),
        loss_fn=lm_loss,
        progress=False,
    )
    trainer.fit()
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-0000002"]


class _SignalsDuringSave(Stream):
    """Batches whose state_dict (read inside the checkpoint save) sends this process two SIGINTs:
    the double Ctrl-C landing mid-save, for real."""

    def __init__(self, batches, at_save):
        super().__init__(batches)
        self.saves, self.at_save = 0, at_save

    def state_dict(self):
        self.saves += 1
        if self.saves == self.at_save:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return {"saves": self.saves}


def test_a_second_ctrl_c_during_the_save_waits_for_it(tmp_path, caplog, new_model):
    # what fit() must restore: default_int_handler, or SIG_IGN when pytest was started in the
    # background of a non-interactive shell (which starts Python with SIGINT ignored)
    before = signal.getsignal(signal.SIGINT)
    trainer = Trainer(
        new_model(),
        _cfg(steps=10, ckpt_every=2),
        tmp_path,
        batches=_SignalsDuringSave(_batches(10), 2),
        loss_fn=lm_loss,
        progress=False,
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.step == 4 and [p.name for p in list_checkpoints(tmp_path)] == [
        "step-0000002",
        "step-0000004",
    ]
    assert "a checkpoint is being saved" in caplog.text
    assert torch.load(list_checkpoints(tmp_path)[-1] / "state.pt", weights_only=True)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before  # restored


# ---------------------------------------------------------------- through pretrain() and the CLI


def _pretrain_cfg(root, out, **train):
    return load_config(
        None,
        {
            "out_dir": str(out),
            "data": {"inputs": [str(root / "docs.jsonl")]},
            "tokenizer": {"vocab_size": 300, "min_frequency": 1},
            "model": {
                "preset": "llama",
                "d_model": 32,
                "n_layers": 1,
                "n_heads": 4,
                "max_seq_len": 32,
            },
            "train": {
                "steps": 4,
                "batch_size": 4,
                "precision": "fp32",
                "eval_every": 0,
                "eval_batches": 1,
                "ckpt_every": 2,
                "log_every": 0,
                "warmup_steps": 1,
                "threads": 1,
                **train,
            },
        },
    )


def test_resume_refuses_changed_settings_and_resume_changed_continues(tmp_path, tiny_corpus):
    from zerolm.train.pretrain import pretrain

    (tmp_path / "docs.jsonl").write_bytes((tiny_corpus / "docs.jsonl").read_bytes())
    out = tmp_path / "run"
    pretrain(_pretrain_cfg(tmp_path, out), progress=False)
    pretrain(
        _pretrain_cfg(tmp_path, out, steps=6, resume=True), progress=False
    )  # training longer: same run
    changed = _pretrain_cfg(tmp_path, out, steps=8, resume=True, batch_size=16, lr=0.1)
    with pytest.raises(ValueError) as e:
        pretrain(changed, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "step-0000006" in msg and "--resume-changed" in msg
    assert "train.batch_size changed 4 -> 16" in msg and "train.lr changed 0.001 -> 0.1" in msg
    pretrain(
        dataclasses.replace(changed, train=dataclasses.replace(changed.train, resume_changed=True)),
        progress=False,
    )
    rows = _strict_rows(out / "train_log.jsonl")
    assert (
        rows[-1]["step"] == 8 and "train.batch_size changed 4 -> 16" in rows[-2]["resume_changed"]
    )
    state = torch.load(list_checkpoints(out)[-1] / "state.pt", weights_only=True)
    assert state["resume_changed"] == [f"step 6: {rows[-2]['resume_changed']}"]


def test_resume_on_appended_documents_refuses_before_rebuilding_anything(tmp_path, tiny_corpus):
    """The speedrun resumes by default through pretrain(): appended input must not slip through."""
    from zerolm.train.pretrain import pretrain

    docs = tmp_path / "docs.jsonl"
    docs.write_bytes((tiny_corpus / "docs.jsonl").read_bytes())
    out = tmp_path / "run"
    pretrain(_pretrain_cfg(tmp_path, out, resume=True), progress=False)
    kept = {
        p: p.read_bytes()
        for p in (out / "tokenizer" / "tokenizer.json", out / "shards" / "meta.json")
    }
    with open(docs, "a") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"new document {i} " + "jjj iii hhh " * 20}) + "\n")
    with pytest.raises(
        ValueError,
        match=r"cannot resume from .*step-0000004: data.files changed '1 file\(s\), \d+ "
        r"bytes' -> '1 file\(s\), \d+ bytes'",
    ):
        pretrain(_pretrain_cfg(tmp_path, out, steps=6, resume=True), progress=False)
    assert all(
        p.read_bytes() == b for p, b in kept.items()
    )  # the run's tokenizer and shards are untouched
    docs.write_bytes(
        (tiny_corpus / "docs.jsonl").read_bytes()
    )  # the same bytes again, but a new mtime: named too
    with pytest.raises(
        ValueError, match=r"data.fingerprint changed \w+ -> \w+ \(input files modified"
    ):
        pretrain(_pretrain_cfg(tmp_path, out, steps=6, resume=True), progress=False)


def test_cli_with_a_huge_lr_saves_no_nan_checkpoint_and_prints_one_line(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "zerolm",
            "pretrain",
            str(tiny_corpus / "docs.jsonl"),
            "--out",
            str(out),
            "--quiet",
            "--tokenizer.vocab_size=300",
            "--tokenizer.min_frequency=1",
            "--model.d_model=32",
            "--model.n_layers=1",
            "--model.n_heads=4",
            "--model.max_seq_len=32",
            "--train.lr=1e12",
            "--train.steps=40",
            "--train.batch_size=4",
            "--train.precision=fp32",
            "--train.ckpt_every=5",
            "--train.eval_every=0",
            "--train.log_every=1000",
            "--train.threads=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and last.startswith(
        "zerolm: error: training diverged: non-finite loss"
    )
    assert not (out / "model").exists()
    assert not list_checkpoints(out) or _all_finite(out)
    _strict_rows(out / "train_log.jsonl")


@pytest.mark.parametrize(
    "command", ["pretrain", "speedrun", "sft", "reward", "dpo", "ppo", "finetune-classify"]
)
def test_resume_changed_flag_sets_the_config_keys(command):
    from zerolm.cli import build_parser
    from zerolm.commands.common import resolve_config as _config

    args, extra = build_parser().parse_known_args([command, "--resume-changed", "--train.lr=0.1"])
    cfg = _config(args, extra)
    assert cfg.train.resume_changed and cfg.train.resume and cfg.train.lr == 0.1
    args, extra = build_parser().parse_known_args([command])
    assert not _config(args, extra).train.resume_changed


def test_a_stages_own_data_files_are_part_of_its_fingerprint(tmp_path):
    """sft/dpo/reward/classify/seq2seq read files named in their own section: a resume compares them
    too."""
    from zerolm.config import load_config
    from zerolm.train.fingerprint import changes, stage_fingerprint

    data = tmp_path / "chats.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "hello"}]}\n'
    )
    cfg = load_config(None, {"sft": {"data": [str(data)]}})
    before = stage_fingerprint(cfg, None, ("sft", "lora"))
    assert changes(before, stage_fingerprint(cfg, None, ("sft", "lora"))) == []
    with open(data, "a") as f:
        f.write(
            '{"messages": [{"role": "user", "content": "bye"}, '
            '{"role": "assistant", "content": "ok"}]}\n'
        )
    found = changes(before, stage_fingerprint(cfg, None, ("sft", "lora")))
    assert len(found) == 1 and found[0].startswith("sft.data.files changed '1 file(s), 93 bytes, ")
