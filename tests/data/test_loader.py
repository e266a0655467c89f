import json
import random
from itertools import islice

import numpy as np
import pytest
import torch

from zerolm.config import load_config
from zerolm.data.loader import TokenBatches, eval_batches
from zerolm.data.prepare import prepare
from zerolm.data.shards import open_split

B, T = 4, 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        for _ in range(300)
    ]
    src = root / "docs.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for i in range(200):
            text = f"doc {i} " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            f.write(json.dumps({"text": text}) + "\n")
    cfg = load_config(
        None,
        {
            "out_dir": str(root / "out"),
            "data": {
                "inputs": [str(src)],
                "shard_tokens": 3000,
                "dedup": "none",
                "val_fraction": 0.1,
            },
            "tokenizer": {"vocab_size": 400, "min_frequency": 1},
        },
    )
    prepare(cfg, progress=False)
    return root / "out" / "shards"


def stream(shards, split="train"):
    """The reference: the whole split concatenated in RAM (fine for a test corpus)."""
    return np.concatenate([np.asarray(t) for t in open_split(shards, split).tokens]).astype(
        np.int64
    )


def windows_of(x, y):
    """(B, T) x and y -> the (B, T + 1) windows they came from."""
    assert torch.equal(x[:, 1:], y[:, :-1])
    return torch.cat([x, y[:, -1:]], dim=1)


def take(loader, n):
    return [(x.clone(), y.clone()) for x, y in islice(loader, n)]


def same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)
    )


def test_setup_has_several_shards(shards):
    split = open_split(shards, "train")
    assert len(split.tokens) >= 3


def test_batches_are_slices_of_the_stream_and_one_epoch_covers_every_window_once(shards):
    full = stream(shards)
    n = (len(full) - 1) // T
    loader = TokenBatches(shards, batch_size=B, seq_len=T, seed=3)
    assert loader.n_windows == n and loader.steps_per_epoch == n // B
    index = {full[i * T : i * T + T + 1].tobytes(): i for i in range(n)}  # window content -> i
    assert len(index) == n
    seen = []
    bounds = np.cumsum([len(t) for t in open_split(shards, "train").tokens])[:-1]
    crossing = 0
    for x, y in take(loader, loader.steps_per_epoch):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in windows_of(x, y):
            i = index.get(row.numpy().tobytes())
            assert i is not None, "a row is not a window [i*T, i*T + T + 1) of the stream"
            crossing += any(i * T < b < i * T + T + 1 for b in bounds)
            seen.append(i)
    assert crossing >= 1, "no window crossed a shard-file boundary"
    assert len(seen) == len(set(seen)) == (n // B) * B  # each window once, the tail dropped
    assert seen != sorted(seen)  # shuffled


def test_same_seed_same_batches_other_seed_or_epoch_other_order(shards):
    a = TokenBatches(shards, batch_size=B, seq_len=T, seed=1)
    epoch = a.steps_per_epoch
    first = take(a, 2 * epoch)
    assert same(first, take(TokenBatches(shards, batch_size=B, seq_len=T, seed=1), 2 * epoch))
    assert not same(
        first[:epoch], take(TokenBatches(shards, batch_size=B, seq_len=T, seed=2), epoch)
    )
    assert not same(first[:epoch], first[epoch:])
    assert a.epoch == 1


@pytest.mark.parametrize("skip", [7, None])  # None: resume across an epoch boundary
def test_resume_is_exact(shards, skip):
    ref = TokenBatches(shards, batch_size=B, seq_len=T, seed=5)
    skip = skip or ref.steps_per_epoch - 2
    expected = take(ref, skip + 5)
    a = TokenBatches(shards, batch_size=B, seq_len=T, seed=5)
    take(a, skip)
    state = json.loads(json.dumps(a.state_dict()))  # plain, JSON-serialisable ints
    b = TokenBatches(shards, batch_size=B, seq_len=T, seed=5)
    b.load_state_dict(state)
    assert same(take(b, 5), expected[skip:])


def test_two_ranks_split_the_batches_of_one(shards):
    one = TokenBatches(shards, batch_size=B, seq_len=T, seed=7)
    r0 = TokenBatches(shards, batch_size=B, seq_len=T, seed=7, rank=0, world_size=2)
    r1 = TokenBatches(shards, batch_size=B, seq_len=T, seed=7, rank=1, world_size=2)
    steps = r0.steps_per_epoch
    assert steps == r1.steps_per_epoch == one.steps_per_epoch // 2
    for _ in range(2):  # two epochs
        all_ = take(one, one.steps_per_epoch)
        a, b = take(r0, steps), take(r1, steps)
        assert same(a, all_[0 : 2 * steps : 2]) and same(b, all_[1 : 2 * steps : 2])
        rows_a = {tuple(r.tolist()) for x, y in a for r in windows_of(x, y)}
        rows_b = {tuple(r.tolist()) for x, y in b for r in windows_of(x, y)}
        assert not rows_a & rows_b
    # rank state resumes exactly too
    state = r1.state_dict()
    nxt = take(r1, 3)
    r1b = TokenBatches(shards, batch_size=B, seq_len=T, seed=7, rank=1, world_size=2)
    r1b.load_state_dict(state)
    assert same(take(r1b, 3), nxt)


@pytest.mark.parametrize("bs,max_batches", [(3, None), (1000, None), (3, 2)])
def test_eval_batches_cover_the_split_once(shards, bs, max_batches):
    full = stream(shards, "val")
    batches = list(eval_batches(shards, batch_size=bs, seq_len=T, max_batches=max_batches))
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.long
        assert x.shape[0] <= bs and x.shape[1] <= T
    if max_batches:
        assert len(batches) == max_batches
        assert all(x.shape == (bs, T) for x, _ in batches)
        return
    # concatenating x rows and then the last target rebuilds the whole split, in order
    xs = torch.cat([x.reshape(-1) for x, _ in batches])
    assert sum(y.numel() for _, y in batches) == len(full) - 1  # every target exactly once
    assert np.array_equal(np.append(xs.numpy(), batches[-1][1][-1, -1].item()), full)
    assert [tuple(x.shape) for x, _ in batches[:-2]] == [(bs, T)] * (len(batches) - 2)


def test_errors(shards):
    n = stream(shards).size
    with pytest.raises(
        ValueError, match=rf"'train'.*{n} tokens.*--train\.batch_size.*--model\.max_seq_len"
    ):
        TokenBatches(shards, batch_size=n, seq_len=T)
    with pytest.raises(ValueError, match="world_size 2"):
        TokenBatches(shards, batch_size=(n - 1) // T, seq_len=T, world_size=2, rank=1)
    for bs, t in [(0, T), (B, 0)]:
        with pytest.raises(ValueError, match="must be >= 1"):
            TokenBatches(shards, batch_size=bs, seq_len=t)
        with pytest.raises(ValueError, match="must be >= 1"):
            eval_batches(shards, batch_size=bs, seq_len=t)
    with pytest.raises(ValueError, match="rank"):
        TokenBatches(shards, batch_size=B, seq_len=T, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split 'test'"):
        TokenBatches(shards, "test", batch_size=B, seq_len=T)
