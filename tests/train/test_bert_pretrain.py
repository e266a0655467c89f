"""BERT pretraining: the MLM + NSP loss counts exactly the selected positions; evaluation; a tiny
end-to-end `zerolm pretrain --model.arch=bert` whose masked-LM loss falls."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zerolm.data.mlm import IGNORE, BertIds, collate_pairs
from zerolm.train.mlm import evaluate_mlm, mlm_nsp_loss

V = 60
IDS = BertIds(pad=0, cls=8, sep=9, mask=10, special=frozenset(range(16)), vocab_size=V)  # zerolm's


@pytest.fixture
def new_model(tiny_model):
    """A fresh untrained bert per call (vocab V, 2 heads, window 32, no dropout)."""
    return lambda: tiny_model("bert", V, n_heads=2, max_seq_len=32, dropout=0.0)


def _batch(seed=0, prob=0.15):
    rng = np.random.default_rng(seed)
    pairs = [
        (
            rng.integers(len(IDS.special), V, rng.integers(2, 12)),
            rng.integers(len(IDS.special), V, rng.integers(1, 12)),
            i % 2,
        )
        for i in range(8)
    ]
    return collate_pairs(pairs, IDS, generator=torch.Generator().manual_seed(seed), prob=prob)


class Spy(torch.nn.Module):
    """The model with its final hidden states kept (and optionally perturbed at chosen
    positions)."""

    def __init__(self, model, perturb=None):
        super().__init__()
        self.model, self.cfg, self.perturb = model, model.cfg, perturb

    def hidden(self, *args):
        h = self.model.hidden(*args)
        if self.perturb is not None:
            h = h + 5.0 * self.perturb[..., None] * torch.randn_like(h)
        h.retain_grad()
        self.h = h
        return h

    def mlm_logits(self, h):
        return self.model.mlm_logits(h)

    def nsp_logits(self, h):
        return self.model.nsp_logits(h)


def test_loss_equals_the_full_reference_and_counts_selected_tokens(new_model):
    model, batch = new_model(), _batch()
    ids, seg, att, labels, nsp = batch
    out = mlm_nsp_loss(model, batch)
    loss, n, stats = out.loss, out.n, out.stats
    mlm_logits, nsp_logits = model(ids, seg, att)  # logits at every position: the naive reference
    ref_mlm = F.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    ref_nsp = F.cross_entropy(nsp_logits, nsp)
    assert int(n) == int((labels != IGNORE).sum()) > 0
    assert torch.allclose(stats["mlm"], ref_mlm, atol=1e-5) and torch.allclose(
        stats["nsp"], ref_nsp, atol=1e-5
    )
    assert torch.allclose(loss, ref_mlm + ref_nsp, atol=1e-5)
    assert stats["nsp_acc"] == (nsp_logits.argmax(-1) == nsp).float().mean()
    out2 = mlm_nsp_loss(model, batch, nsp=False)
    mlm_only, n2, stats2 = out2.loss, out2.n, out2.stats
    assert (
        torch.allclose(mlm_only, ref_mlm, atol=1e-5)
        and set(stats2) == {"mlm"}
        and int(n2) == int(n)
    )


def test_unselected_positions_change_nothing_and_get_no_gradient(new_model):
    batch = _batch(seed=1)
    selected = batch[3] != IGNORE
    spy = Spy(new_model())
    loss = mlm_nsp_loss(spy, batch, nsp=False).loss
    loss.backward()
    g = spy.h.grad.abs().sum(-1)  # (B, T): gradient reaching each final hidden state
    assert (g[selected] > 0).all() and (g[~selected] == 0).all()
    # NSP reads the [CLS] state only: with it, position 0 gets gradient too, and nothing else new
    spy = Spy(new_model())
    mlm_nsp_loss(spy, batch).loss.backward()
    g = spy.h.grad.abs().sum(-1)
    rest = ~selected
    rest[:, 0] = False
    assert (g[:, 0] > 0).all() and (g[rest] == 0).all()
    # noise on the hidden states of unselected positions (not [CLS]) leaves the loss as it was
    torch.manual_seed(0)
    perturb = (~selected).float()
    perturb[:, 0] = 0
    base = mlm_nsp_loss(Spy(new_model()), batch).loss
    noisy = mlm_nsp_loss(Spy(new_model(), perturb), batch).loss
    assert torch.allclose(base, noisy, atol=1e-6)
    # and the labels of unselected positions are not read: any value there gives the same loss
    ids, seg, att, labels, nsp = batch
    other = torch.where(selected, labels, IGNORE)
    assert torch.equal(mlm_nsp_loss(new_model(), (ids, seg, att, other, nsp)).loss, base)


def test_evaluate_mlm_figures(new_model):
    model = new_model()
    batches = [_batch(seed=s) for s in range(3)]
    out = evaluate_mlm(model, batches)
    assert set(out) == {"val_mlm_loss", "val_mlm_acc", "val_nsp_loss", "val_nsp_acc"}
    assert abs(out["val_mlm_loss"] - np.log(V)) < 1.0 and 0 <= out["val_mlm_acc"] <= 1
    n = sum(int((b[3] != IGNORE).sum()) for b in batches)
    with torch.no_grad():
        by_hand = (
            sum(
                float(mlm_nsp_loss(model, b, nsp=False).loss) * int((b[3] != IGNORE).sum())
                for b in batches
            )
            / n
        )
    assert out["val_mlm_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert set(evaluate_mlm(model, batches, nsp=False)) == {"val_mlm_loss", "val_mlm_acc"}


@pytest.mark.slow
def test_tiny_bert_pretrain_via_cli_loss_decreases(tmp_path):
    """A few hundred documents of a tiny grammar; MLM falls from ~log(V) to well below it."""
    rng = random.Random(0)
    subjects, verbs, objects = (
        ["春风", "明月", "白云", "青山", "流水", "孤舟"],
        "照过送入随望",
        ["江南", "故乡", "高楼", "远山"],
    )
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for _ in range(300):
            lines = [
                f"{rng.choice(subjects)}{rng.choice(verbs)}{rng.choice(objects)}。"
                for _ in range(rng.randint(2, 6))
            ]
            f.write(json.dumps({"text": "\n".join(lines)}, ensure_ascii=False) + "\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "zerolm",
            "pretrain",
            "docs.jsonl",
            "--out",
            "run",
            "--quiet",
            "--model.arch=bert",
            "--model.d_model=32",
            "--model.n_layers=2",
            "--model.n_heads=2",
            "--model.max_seq_len=32",
            "--model.dropout=0",
            "--tokenizer.kind=wordpiece",
            "--tokenizer.vocab_size=100",
            "--tokenizer.min_frequency=1",
            "--data.val_fraction=0.1",
            "--data.dedup=exact",
            "--train.steps=80",
            "--train.batch_size=16",
            "--train.lr=3e-3",
            "--train.warmup_steps=10",
            "--train.eval_every=40",
            "--train.precision=fp32",
            "--train.ckpt_every=1000",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert "sentence pairs: train" in r.stderr and "final held-out" in r.stderr
    rows = [json.loads(line) for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert len(rows) == 80 and {"mlm", "nsp", "nsp_acc"} <= set(rows[0])
    first, last = np.mean([r["mlm"] for r in rows[:5]]), np.mean([r["mlm"] for r in rows[-5:]])
    assert first > 3.0 and last < first - 1.0, (first, last)
    evals = [r for r in rows if "val_mlm_loss" in r]
    assert len(evals) == 2 and evals[-1]["val_mlm_loss"] < first - 1.0
    from zerolm.model import load_model

    model = load_model(tmp_path / "run" / "model")
    assert model.cfg.arch == "bert" and (tmp_path / "run" / "model" / "tokenizer.json").is_file()
    from zerolm.config import load_config
    from zerolm.train.pretrain import pretrain

    with pytest.raises(
        ValueError, match="already holds checkpoints"
    ):  # the arch dispatch, in-process
        pretrain(load_config(None, {"out_dir": str(tmp_path / "run"), "model": {"arch": "bert"}}))
