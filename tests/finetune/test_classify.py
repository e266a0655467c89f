"""Sequence classification with bert: the fine-tune learns a separable toy task above the majority
class, the bag-of-characters baseline, `zerolm classify`, and every bad-input error."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from zerolm.config import load_config
from zerolm.eval.baselines import CharFeatures, bag_of_chars_baseline, fit_logreg, majority_baseline
from zerolm.finetune.classify import finetune_classify
from zerolm.finetune.classify_data import Row, encode, read_rows, tang_authors
from zerolm.finetune.classify_model import classifier_from
from zerolm.finetune.classify_predict import classify_file
from zerolm.model import save_model

SEA, HILL = "海浪潮波鱼舟帆沙", "山峰岭石松云崖径"


def _toy(n, seed):
    """Texts of sea characters ('sea', 60 %) or hill characters ('hill'), with shared filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = "sea" if rng.random() < 0.6 else "hill"
        chars = SEA if label == "sea" else HILL
        rows.append(
            {
                "text": "".join(rng.choice(chars + "之而其") for _ in range(rng.randint(4, 12))),
                "label": label,
            }
        )
    return rows


def _write(path, rows):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    """A tiny (untrained) bert with a wordpiece tokenizer over the toy characters."""
    root = tmp_path_factory.mktemp("cls")
    tok = tiny_tokenizer("wordpiece", [SEA + HILL + "之而其天地人"], vocab_size=100)
    model = tiny_model("bert", tok.vocab_size, n_heads=2, max_seq_len=24, dropout=0.0)
    save_model(model, root / "bert", tok)
    _write(root / "train.jsonl", _toy(300, 0))
    _write(root / "val.jsonl", _toy(100, 1))
    return root


def _cfg(root, out="out", **classify):
    return load_config(
        None,
        {
            "out_dir": str(root / out),
            "classify": {
                "base_model": str(root / "bert"),
                "data": [str(root / "train.jsonl")],
                "val_data": [str(root / "val.jsonl")],
                **classify,
            },
            "train": {
                "steps": 60,
                "batch_size": 16,
                "lr": 3e-3,
                "warmup_steps": 5,
                "eval_every": 30,
                "precision": "fp32",
                "ckpt_every": 1000,
            },
        },
    )


@pytest.fixture(scope="module")
def trained(bert_dir):
    """The fine-tune's result, run once for the tests that need a classifier (in any order)."""
    return finetune_classify(_cfg(bert_dir), progress=False)


def test_finetune_learns_a_separable_task_above_the_majority(bert_dir, trained):
    r = trained
    assert r.info["labels"] == 2 and r.info["train_rows"] == 300 and r.info["val_rows"] == 100
    assert 0.5 < r.info["majority_acc"] < 0.75 and r.info["boc_lr_acc"] == 1.0
    assert r.final["val_acc"] >= 0.95 > r.info["majority_acc"] + 0.2
    model_dir = bert_dir / "out" / "model"
    assert json.loads((model_dir / "labels.json").read_text()) == [
        "sea",
        "hill",
    ]  # most frequent first
    got = classify_file(model_dir, bert_dir / "val.jsonl")
    assert got["rows"] == 100 and got["val_acc"] == pytest.approx(r.final["val_acc"])
    assert set(got["predictions"]) <= {"sea", "hill"}
    (bert_dir / "plain.txt").write_text("海浪鱼舟\n山峰松云\n", encoding="utf-8")
    assert classify_file(model_dir, bert_dir / "plain.txt")["predictions"] == ["sea", "hill"]


def test_classify_cli_prints_labels_and_accuracy(bert_dir, trained, capsys):
    from zerolm.cli import main

    assert (
        main(["classify", str(bert_dir / "out" / "model"), "--input", str(bert_dir / "val.jsonl")])
        == 0
    )
    out, err = capsys.readouterr()
    assert len(out.split()) == 100 and set(out.split()) <= {"sea", "hill"}
    assert "accuracy" in err and "on 100 labelled rows" in err


def test_classifier_keeps_pretrained_weights_and_adds_a_fresh_head(bert_dir):
    from safetensors.torch import load_file

    model = classifier_from(bert_dir / "bert", 3, seed=1)
    base = load_file(str(bert_dir / "bert" / "model.safetensors"))
    own = model.state_dict()
    assert set(own) - set(base) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(own[k], v) for k, v in base.items())
    assert model.classify_logits(model.hidden(torch.tensor([[8, 20, 9]]))).shape == (1, 3)


def test_logistic_regression_baseline_on_a_separable_set():
    train, val = _toy(200, 2), _toy(50, 3)
    y = {"sea": 0, "hill": 1}
    r = bag_of_chars_baseline(
        [t["text"] for t in train],
        [y[t["label"]] for t in train],
        [t["text"] for t in val],
        [y[t["label"]] for t in val],
        2,
    )
    assert r["accuracy"] == 1.0 and r["features"] == len(set(SEA + HILL + "之而其"))
    assert majority_baseline([0, 0, 1], [0, 1, 1, 1])["accuracy"] == 0.25


def test_logistic_regression_gradient_and_fit_match_autograd():
    texts = ["海山", "海海浪", "山云", "浪", "云云山石"]
    X, y = CharFeatures(texts)(texts), torch.tensor([0, 0, 1, 0, 1])
    W, b = fit_logreg(X, y, 2, l2=1e-2)
    Wr, br = W.clone().requires_grad_(), b.clone().requires_grad_()
    loss = F.cross_entropy(X.to_dense() @ Wr + br, y) + 1e-2 * Wr.pow(2).sum()
    loss.backward()
    assert (
        Wr.grad.abs().max() < 1e-4 and br.grad.abs().max() < 1e-4
    )  # a stationary point of the true objective
    norms = X.to_dense().norm(dim=1)
    assert torch.allclose(norms, torch.ones(5))


def test_encode_truncation_policies(tiny_tokenizer):
    tok = tiny_tokenizer("wordpiece", [SEA + HILL], vocab_size=100)
    rows = [Row("海" * 20, "山" * 5, where="f:1"), Row("海浪", where="f:2")]
    enc, cut = encode(tok, rows, 16)
    assert (
        cut == 1 and len(enc[0][0]) == 16 and enc[0][1].count(1) == 6
    )  # the longer text lost 12 tokens
    assert len(enc[1][0]) == 4
    with pytest.raises(ValueError, match="f:1: 28 tokens with .* exceed the 16-token window"):
        encode(tok, rows, 16, "error")


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_label", "no label field 'label': every training row needs a label"),
        ("unseen", "label 'lake' was never seen in training; known labels: sea, hill"),
        ("too_long", "exceed the 24-token window"),
        ("decoder", "is a decoder model: finetune-classify needs a bert encoder"),
        ("no_data", "no classification data"),
        ("bad_json", "not valid JSON"),
    ],
)
def test_bad_inputs_are_clear_errors(bert_dir, tmp_path, case, message, tiny_model):
    cfg = {}
    if case == "no_label":
        cfg["data"] = [str(_write(tmp_path / "t.jsonl", [{"text": "海"}, {"text": "山"}]))]
    elif case == "unseen":
        cfg["val_data"] = [str(_write(tmp_path / "v.jsonl", [{"text": "海", "label": "lake"}]))]
    elif case == "too_long":
        cfg |= {
            "data": [
                str(
                    _write(
                        tmp_path / "t.jsonl",
                        [{"text": "海" * 30, "label": "sea"}, {"text": "山", "label": "hill"}],
                    )
                )
            ],
            "truncation": "error",
        }
    elif case == "decoder":
        from zerolm.tokenizer import Tokenizer

        save_model(
            tiny_model("llama", 100, d_model=16, n_layers=1, n_heads=2, max_seq_len=8),
            tmp_path / "llama",
            Tokenizer.load(bert_dir / "bert"),
        )
        cfg["base_model"] = str(tmp_path / "llama")
    elif case == "no_data":
        cfg["data"] = []
    elif case == "bad_json":
        (tmp_path / "t.jsonl").write_text(
            '{"text": "海", "label": "sea"}\n{"text": \n', encoding="utf-8"
        )
        cfg["data"] = [str(tmp_path / "t.jsonl")]
    with pytest.raises(ValueError, match=message):
        finetune_classify(_cfg(bert_dir, out=f"bad-{case}", **cfg), progress=False)
    assert not (bert_dir / f"bad-{case}" / "model").exists()


def test_classify_errors(bert_dir, trained, tmp_path):
    with pytest.raises(ValueError, match="is not a classifier"):
        classify_file(bert_dir / "bert", bert_dir / "val.jsonl")
    _write(tmp_path / "x.jsonl", [{"text": "海", "label": "sea"}, {"text": "山", "label": "lake"}])
    with pytest.raises(
        ValueError,
        match="x.jsonl:2: label 'lake' was never seen in training; known labels: sea, hill",
    ):
        classify_file(bert_dir / "out" / "model", tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="no text field 'body'"):
        read_rows(tmp_path / "x.jsonl", text_field="body")
    (tmp_path / "bad.jsonl").write_bytes(
        b'{"text": "a", "label": "sea"}\n{"text": "\xe6\xb5", "label": "sea"}\n'
    )
    with pytest.raises(
        ValueError, match=r"bad.jsonl: invalid UTF-8 at byte offset \d+ \(line 2\); convert"
    ):
        read_rows(tmp_path / "bad.jsonl")


def test_tang_authors_split_by_poem(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    poets = ["甲"] * 5 + ["乙"] * 4 + ["丙"] * 3 + ["不详"] * 9 + ["丁"]
    _write(docs / "train.jsonl", [{"text": f"诗{i}", "author": a} for i, a in enumerate(poets)])
    _write(docs / "val.jsonl", [{"text": "诗v1", "author": "乙"}, {"text": "诗v2", "author": "丁"}])
    train, val, info = tang_authors(docs, 3)
    assert info["authors"] == ["甲", "乙", "丙"]  # "unknown author" is not a poet
    assert len(train) == 12 and [r.label for r in val] == ["乙"]
    with pytest.raises(ValueError, match="needs prepared Tang documents"):
        tang_authors(tmp_path / "nowhere", 3)
