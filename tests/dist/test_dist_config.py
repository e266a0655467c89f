"""The [dist] section, the rank slices of a batch and the single-process defaults (no processes)."""

import argparse

import pytest
import torch

from zerolm.commands.common import resolve_config
from zerolm.config import DistConfig
from zerolm.dist import group
from zerolm.train.parallel import shard_rows


def test_dist_strategy_is_a_dotted_override_like_the_others():
    cfg = resolve_config(argparse.Namespace(config=None), ["--dist.strategy", "fsdp"])
    assert cfg.dist.strategy == "fsdp" and cfg.dist.timeout == 1800
    assert resolve_config(argparse.Namespace(config=None), []).dist.strategy == ""


def test_one_process_is_strategy_none_whatever_is_asked(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for s in ("", "ddp", "fsdp"):
        assert group.strategy(DistConfig(strategy=s)) == "none"  # type: ignore[arg-type]
    group.init(DistConfig(strategy="fsdp"))
    assert not torch.distributed.is_initialized()
    assert group.world_size() == 1 and group.is_main() and group.broadcast(3) == 3


def test_under_torchrun_the_default_is_ddp_and_none_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert group.strategy(DistConfig()) == "ddp"
    assert group.strategy(DistConfig(strategy="fsdp")) == "fsdp"
    with pytest.raises(ValueError, match="--dist.strategy=none under torchrun with WORLD_SIZE=2"):
        group.strategy(DistConfig(strategy="none"))


def test_each_rank_takes_contiguous_rows_of_every_tensor_and_of_each_half_of_pairs():
    x = torch.arange(8)[:, None].expand(8, 3)
    batch = (x, {"ids": torch.arange(4)}, torch.tensor(5.0), None)
    r1 = shard_rows(batch, 1, 2)
    assert r1[0][:, 0].tolist() == [4, 5, 6, 7] and r1[1]["ids"].tolist() == [2, 3]
    assert r1[2].item() == 5.0 and r1[3] is None
    # 4 chosen rows then 4 rejected: rank 1 takes chosen 2, 3 and rejected 2, 3 (rows 6, 7)
    assert shard_rows(x, 1, 2, groups=2)[:, 0].tolist() == [2, 3, 6, 7]
    # rows the world size does not divide (an epoch's short last batch): near-equal blocks
    assert [len(shard_rows(torch.arange(5), r, 2)) for r in (0, 1)] == [3, 2]


def test_a_batch_the_world_size_does_not_divide_names_both_and_the_fix():
    group.check_batch(8, 2)
    with pytest.raises(ValueError, match=r"batch_size 6 .* world size 4: use --train.batch_size=8"):
        group.check_batch(6, 4)


def test_the_speedrun_under_torchrun_points_at_its_pretraining(monkeypatch, capsys):
    from zerolm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["speedrun", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert (
        "not under torchrun (WORLD_SIZE=2)" in err and "-m zerolm pretrain --config speedrun" in err
    )


def test_ppo_under_torchrun_is_a_clear_error(monkeypatch, capsys):
    # PPO's rollouts are sampled by one process: the stage refuses a world before joining it
    from zerolm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["ppo", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert "zerolm ppo runs in one process, not under torchrun (WORLD_SIZE=2)" in err
    assert "start it without torchrun" in err
