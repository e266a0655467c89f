"""Sharded (DCP) checkpoints and failures on 2 real gloo processes: a rank SIGKILLed after a
checkpoint leaves it valid, it resumes in one process with the uninterrupted run's losses, a
one-process checkpoint resumes on 2 ranks, a dead or hung rank ends the others, and a partial
checkpoint is never resumed from. fp32; ckpt_cases.py holds the runs."""

import json
import shutil
import signal
import time
from pathlib import Path

import ckpt_cases
import pytest
import torch
from launch import ROOT, plain, torchrun

from zerolm.train.checkpoint import list_checkpoints, remove_partial
from zerolm.train.sharded import is_sharded

pytestmark = [pytest.mark.dist, pytest.mark.slow]
CASES = str(ROOT / "tests" / "dist" / "ckpt_cases.py")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One torchrun job: an uninterrupted DDP run, an FSDP2 run, then a run whose rank 1 is
    SIGKILLed during step 8 (after step 5's checkpoint), which ends the job."""
    out = tmp_path_factory.mktemp("ckpt")
    t0 = time.monotonic()
    r = torchrun(CASES, str(out), "full", "fsdp", "killed")
    return out, r, time.monotonic() - t0, torch.load(out / "results.pt")


def upto(src: Path, dst: Path, step: int, rows: int | None = None) -> Path:
    """A copy of run `src` as it was at `step`: its checkpoints and log rows (up to `rows`)
    up to there."""
    shutil.copytree(src, dst)
    for p in list_checkpoints(dst):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    log = dst / "train_log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("".join(r + "\n" for r in lines if json.loads(r)["step"] <= (rows or step)))
    return dst


def test_a_killed_rank_leaves_the_checkpoint_that_one_process_resumes_exactly(job):
    out, r, seconds, results = job
    assert r.returncode != 0 and "killed" not in results
    assert "exitcode  : -9" in r.stderr  # rank 1 really died of SIGKILL
    assert "rank 0 lost rank 1 while training step 8" in r.stderr
    assert "step-0000005; resume with --train.resume=true" in r.stderr
    assert seconds < 60
    found = list_checkpoints(out / "killed")
    assert [p.name for p in found] == ["step-0000005"] and is_sharded(found[0])
    assert sorted(p.name for p in found[0].glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    resumed = ckpt_cases.fit(out / "killed", resume=True)  # one process, no process group
    assert not torch.distributed.is_initialized()
    full = results["full"]
    assert resumed == pytest.approx(full, abs=1e-6, rel=0)
    assert max(abs(a - b) for a, b in zip(full[5:], full[4:])) > 1e-4  # the steps differ


def test_fsdp2_shards_resume_in_one_process(job, tmp_path):
    out, _, _, results = job
    run = upto(out / "fsdp", tmp_path / "fsdp", 5)
    assert is_sharded(list_checkpoints(run)[-1])
    assert ckpt_cases.fit(run, resume=True) == pytest.approx(results["fsdp"], abs=1e-5, rel=0)
    assert results["fsdp"] == pytest.approx(results["full"], abs=1e-5, rel=0)


@pytest.mark.parametrize("mode", ["resume", "resume_fsdp"])
def test_a_one_process_checkpoint_resumes_on_2_ranks(tmp_path, mode):
    ref = ckpt_cases.fit(tmp_path / "one")
    assert (list_checkpoints(tmp_path / "one")[0] / "model.safetensors").is_file()
    upto(tmp_path / "one", tmp_path / "two" / mode, 5)
    r = torchrun(CASES, str(tmp_path / "two"), mode)
    assert r.returncode == 0, r.stderr[-3000:]
    tol = 1e-6 if mode == "resume" else 1e-5
    assert torch.load(tmp_path / "two" / "results.pt")[mode] == pytest.approx(ref, abs=tol, rel=0)
    assert is_sharded(list_checkpoints(tmp_path / "two" / mode)[-1])  # its own, step 10


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_dead_or_hung_rank_makes_the_other_exit_non_zero_within_60_s(tmp_path, how):
    # plain processes, no torchrun to kill the survivor: it must notice by itself
    procs = plain(CASES, str(tmp_path), how, ZEROLM_TEST_TIMEOUT="10")
    try:
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        seconds = time.monotonic() - t0
        assert procs[0].returncode != 0
        assert "rank 0 lost rank 1 while training step 8" in err, err[-2000:]
        assert seconds < 60
        if how == "stopped":
            assert procs[1].poll() is None  # hung, not dead: the timeout ended rank 0
            assert "--dist.timeout=10s" in err
        else:
            assert procs[1].wait(timeout=10) == -signal.SIGKILL
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert [p.name for p in list_checkpoints(tmp_path / how)] == ["step-0000005"]


def test_a_partial_sharded_checkpoint_is_never_picked_up(job, tmp_path):
    out, _, _, results = job
    run = upto(out / "full", tmp_path / "run", 10, rows=5)
    step10 = run / "checkpoints" / "step-0000010"
    # what a kill during step 10's save leaves: the shards in the temporary directory, or
    # (written by no zerolm, but possible by hand) a step directory without DCP's .metadata
    step10.rename(step10.with_name(".step-0000010.dcp.tmp"))
    shutil.copytree(run / "checkpoints" / "step-0000005", step10)
    (step10 / ".metadata").unlink()
    assert [p.name for p in list_checkpoints(run)] == ["step-0000005"]
    remove_partial(run)
    assert not (run / "checkpoints" / ".step-0000010.dcp.tmp").exists()
    shutil.rmtree(step10)
    # resuming takes step 5 and trains steps 6-10 again, as the uninterrupted run did
    assert ckpt_cases.fit(run, resume=True) == pytest.approx(results["full"], abs=1e-6, rel=0)
