"""The encoder-decoder training stage: batches, the label-smoothed loss, too-long pairs, and a tiny
end-to-end run through the CLI that learns a toy translation (and is scored with sacrebleu)."""

import json
import math
import random

import pytest
import torch

from zerolm.cli import main
from zerolm.eval.translation import score
from zerolm.model import load_model
from zerolm.train.seq2seq import IGNORE, collate, encode_pairs, seq2seq_loss

IDS = dict(pad=0, bos=1, eos=2)


def test_collate_shifts_targets_and_masks_padding():
    src, src_mask, tgt_in, tgt_out = collate([([20, 21, 2], [30]), ([22, 2], [31, 32, 33])], **IDS)
    assert src.tolist() == [[20, 21, 2], [22, 2, 0]] and src_mask.tolist() == [
        [True] * 3,
        [True, True, False],
    ]
    assert tgt_in.tolist() == [[1, 30, 0, 0], [1, 31, 32, 33]]
    assert tgt_out.tolist() == [[30, 2, IGNORE, IGNORE], [31, 32, 33, 2]]


def test_loss_is_label_smoothed_cross_entropy_over_real_target_tokens(tiny_model):
    torch.manual_seed(0)
    model = tiny_model("transformer", 40, n_layers=1, n_heads=2, max_seq_len=16, dropout=0.0)
    batch = collate([([20, 21, 2], [30]), ([22, 2], [31, 32, 33])], **IDS)
    out = seq2seq_loss(model, batch, label_smoothing=0.1)
    loss, n = out.loss, out.n
    assert int(n) == 6
    with torch.no_grad():
        logp = model(batch[0], batch[2], batch[1]).log_softmax(-1)
    y = batch[3]
    real = y != IGNORE
    nll = -logp.gather(-1, y.clamp(min=0)[..., None])[..., 0][real]
    uniform = -logp.mean(-1)[real]  # smoothing spreads 0.1 uniformly over the vocabulary
    assert torch.allclose(loss, (0.9 * nll + 0.1 * uniform).mean(), atol=1e-5)
    # the padded target positions do not count: changing what is fed there changes nothing
    batch2 = (batch[0], batch[1], batch[2].clone(), y)
    batch2[2][0, 2:] = 35
    assert torch.allclose(seq2seq_loss(model, batch2, 0.1).loss, loss, atol=1e-6)
    assert math.isclose(
        seq2seq_loss(model, batch, 0.0).loss.item(), nll.mean().item(), rel_tol=1e-5
    )


def test_too_long_pairs_are_an_error_or_dropped(tok):
    pairs = [("short", "short"), ("a much longer source sentence " * 4, "x")]
    with pytest.raises(
        ValueError,
        match=r"train pair 2 .* more than the model window of 12: raise --model.max_seq_len",
    ):
        encode_pairs(tok, pairs, 12)
    items, dropped = encode_pairs(tok, pairs, 12, too_long="drop")
    assert dropped == 1 and len(items) == 1 and items[0][0][-1] == tok.token_id("<|eos|>")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(random.Random(i).choices(words, k=6)) for i in range(200)]
    return tiny_tokenizer("bpe", texts)


def test_tiny_translation_run_learns_and_beats_copying(tmp_path, capsys):
    """Toy 'translation': reverse the order of the words. Copying the source is a poor baseline; a
    tiny model trained for a few hundred steps should beat it clearly, through `zerolm pretrain`."""
    words = ["sun", "moon", "star", "sky", "sea", "hill", "tree", "rain"]
    rng = random.Random(0)
    src = [" ".join(rng.choices(words, k=rng.randint(3, 5))) for _ in range(800)]
    (tmp_path / "src.txt").write_text("".join(s + "\n" for s in src))
    (tmp_path / "tgt.txt").write_text("".join(" ".join(s.split()[::-1]) + "\n" for s in src))
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--out",
        str(out),
        "--quiet",
        "--model.arch=encdec",
        "--model.d_model=64",
        "--model.n_layers=2",
        "--model.n_heads=4",
        "--model.max_seq_len=32",
        "--model.dropout=0.0",
        "--tokenizer.vocab_size=300",
        f"--seq2seq.source={tmp_path / 'src.txt'}",
        f"--seq2seq.target={tmp_path / 'tgt.txt'}",
        "--seq2seq.val_fraction=0.1",
        "--seq2seq.eval_pairs=40",
        "--seq2seq.beam=2",
        "--seq2seq.label_smoothing=0.0",
        "--train.steps=200",
        "--train.batch_size=32",
        "--train.lr=3e-3",
        "--train.warmup_steps=20",
        "--train.eval_every=100",
        "--train.precision=fp32",
        "--train.log_every=100",
    ]
    assert main(args) == 0
    scores = json.loads((out / "eval" / "scores.json").read_text())
    assert scores["pairs"] == 40 and scores["bleu"] > 80 > scores["copy_bleu"] + 30, scores
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.3 * log[0]["loss"]
    assert load_model(out / "model").cfg.arch == "encdec"
    # zerolm translate reproduces the stage's figures from its saved files
    capsys.readouterr()
    ev = out / "eval"
    assert (
        main(
            [
                "translate",
                str(out / "model"),
                "--input",
                str(ev / "source.txt"),
                "--reference",
                str(ev / "reference.txt"),
                "--beam",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["bleu"] == pytest.approx(scores["bleu"]) and printed[
        "copy_bleu"
    ] == pytest.approx(scores["copy_bleu"])
    hyps = (ev / "translation.txt").read_text().splitlines()
    refs = (ev / "reference.txt").read_text().splitlines()
    assert score(hyps, refs)["bleu"] == pytest.approx(scores["bleu"])
    # bad input: mismatched files, a decoder given to translate, sampling with a beam
    assert (
        main(
            [
                "translate",
                str(out / "model"),
                "--input",
                str(ev / "source.txt"),
                "--reference",
                str(tmp_path / "src.txt"),
            ]
        )
        == 2
    )
    assert "line-aligned" in capsys.readouterr().err
    assert main(["translate", str(out / "model"), "sun moon", "--temperature", "0.8"]) == 2
    assert "--beam 1" in capsys.readouterr().err


def test_inspect_accounts_both_stacks_and_cross_attention(tiny_model):
    from zerolm.inspect.accounting import account

    model = tiny_model("transformer", 100, d_model=64, n_decoder_layers=3, max_seq_len=32)
    a = account(model)
    cross = sum(p.numel() for n, p in model.named_parameters() if ".cross_attn." in n)
    assert cross == 3 * (4 * 64 * 64 + 4 * 64) and a["parameters"]["attention"] == (2 + 3 + 3) * (
        4 * 64 * 64 + 4 * 64
    )
    assert a["estimate_12_d2_N"] == 12 * 64**2 * 2 + 16 * 64**2 * 3
    assert (
        abs(a["non_embedding"] / a["estimate_12_d2_N"] - 1) < 0.02
    )  # d_ff = 4d, biases and norms aside
    assert (
        a["kv_cache_bytes"] == 2 * (2 * 3) * 32 * 64 * 4
    )  # decoder self- and cross-attention, fp32
