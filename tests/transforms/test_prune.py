"""Unstructured pruning (magnitude, wanda, 2:4): the pruned model is the masked dense model, the
masks keep what the scores say, each layer has the requested sparsity, and bad input is a
one-line error; `zerolm prune` runs end to end and its output loads everywhere."""

import copy

import pytest
import torch

from zerolm.cli import main
from zerolm.config import PruneConfig, QuantConfig
from zerolm.model import load_model, save_model
from zerolm.transforms.prune import format_sparsity, prune_model, prune_targets, sparsity_report
from zerolm.transforms.quantize import quantize_model

V = 64
IDS = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, V, (10, 24), generator=torch.Generator().manual_seed(2))
MODELS = [("llama", {"n_kv_heads": 2}), ("gpt2", {})]


def masked_dense(dense, pruned):
    """The dense model with each block linear multiplied by the pruned model's nonzero mask."""
    out = copy.deepcopy(dense)
    with torch.no_grad():
        for name, mod in prune_targets(out).items():
            mod.weight.mul_(pruned.get_submodule(name).weight != 0)
    return out


def block_inputs(model, dense, i):
    """Inputs of block i's linears as wanda sees them: blocks before i pruned, block i dense."""
    hybrid = copy.deepcopy(model)
    hybrid.blocks[i] = copy.deepcopy(dense.blocks[i])
    seen: dict = {}
    hooks = [
        mod.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0]))
        for n, mod in prune_targets(hybrid.blocks[i], prefix="").items()
    ]
    with torch.no_grad():
        hybrid(CALIB)
    for h in hooks:
        h.remove()
    return {n: torch.cat([a.reshape(-1, a.shape[-1]) for a in v]) for n, v in seen.items()}


def check_rows(score, keep, sparsity):
    """Per row: floor or ceil of sparsity·K dropped, round(sparsity·N·K) in all, and no dropped
    score above a kept one."""
    n, k = score.shape
    dropped = (~keep).sum(1)
    assert int(dropped.sum()) == round(sparsity * n * k)
    assert set(dropped.tolist()) <= {int(sparsity * k), int(sparsity * k) + 1}
    for s, m in zip(score, keep):
        assert s[~m].max() <= s[m].min()


@pytest.mark.parametrize("preset, kw", MODELS)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_pruned_model_equals_the_masked_dense_model(tiny_model, preset, kw, method):
    dense = tiny_model(preset, vocab_size=V, **kw).eval()
    pruned = prune_model(copy.deepcopy(dense), PruneConfig(method=method, sparsity=0.4), CALIB)
    with torch.no_grad():
        assert torch.equal(pruned(IDS), masked_dense(dense, pruned)(IDS))
        other = dict(dense.named_parameters())  # norms, biases, embeddings, head untouched
        for name, p in pruned.named_parameters():
            if name.removesuffix(".weight") not in prune_targets(pruned):
                assert torch.equal(p, other[name]), name


def test_magnitude_drops_the_smallest_weights_of_each_layer(tiny_model):
    dense = tiny_model("llama", vocab_size=V).eval()
    pruned = prune_model(copy.deepcopy(dense), PruneConfig(method="magnitude", sparsity=0.3))
    for name, mod in prune_targets(pruned).items():
        w = dense.get_submodule(name).weight.abs().flatten()
        keep = mod.weight.flatten() != 0
        assert int((~keep).sum()) == round(0.3 * w.numel())
        assert w[~keep].max() <= w[keep].min()


@pytest.mark.parametrize("preset, kw", MODELS)
def test_wanda_keeps_the_top_scores_of_each_row(tiny_model, preset, kw):
    dense = tiny_model(preset, vocab_size=V, **kw).eval()
    pruned = prune_model(copy.deepcopy(dense), PruneConfig(method="wanda", sparsity=0.5), CALIB)
    for i in range(len(dense.blocks)):
        inputs = block_inputs(pruned, dense, i)
        for name, x in inputs.items():
            w = dense.blocks[i].get_submodule(name).weight
            score = w.abs() * x.norm(dim=0)[None, :]  # |W_ij| · ||X_j||_2
            check_rows(score, pruned.blocks[i].get_submodule(name).weight != 0, 0.5)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_2_4_keeps_two_of_every_four_inputs(tiny_model, method):
    dense = tiny_model("llama", vocab_size=V).eval()
    cfg = PruneConfig(method=method, pattern="2:4")
    pruned = prune_model(copy.deepcopy(dense), cfg, CALIB)
    inputs = block_inputs(pruned, dense, 1)
    for name, mod in prune_targets(pruned.blocks[1], prefix="").items():
        w = dense.blocks[1].get_submodule(name).weight
        score = w.abs() * (inputs[name].norm(dim=0) if method == "wanda" else 1.0)
        keep = (mod.weight != 0).reshape(w.shape[0], -1, 4)
        assert (keep.sum(-1) == 2).all()
        groups = score.reshape(w.shape[0], -1, 4)
        lowest_kept = groups.masked_fill(~keep, float("inf")).amin(-1)
        highest_dropped = groups.masked_fill(keep, -float("inf")).amax(-1)
        assert (highest_dropped <= lowest_kept).all()
    assert torch.equal(pruned(IDS), masked_dense(dense, pruned)(IDS))


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_every_layer_has_the_requested_sparsity(tiny_model, method, sparsity):
    cfg = PruneConfig(method=method, sparsity=sparsity)
    model = prune_model(tiny_model("gpt2", vocab_size=V).eval(), cfg, CALIB)
    rows = {r["name"]: r for r in sparsity_report(model)}
    assert set(prune_targets(model)) < set(rows)
    for name, r in rows.items():
        if name in prune_targets(model):
            assert r["zeros"] == round(sparsity * r["size"]), name
        else:
            assert r["zeros"] == 0, name  # embeddings (and the tied head) are kept
    table = format_sparsity(list(rows.values()))
    total = float(table.splitlines()[-1].split()[-1].rstrip("%")) / 100
    assert total == pytest.approx(sparsity, abs=2e-4)  # each layer rounds to whole weights


@pytest.mark.parametrize(
    "cfg, model_kw, message",
    [
        (PruneConfig(sparsity=0.0), {}, "must be in (0, 1)"),
        (PruneConfig(sparsity=1.0), {}, "must be in (0, 1)"),
        (PruneConfig(method="wanda", sparsity=-0.1), {}, "must be in (0, 1)"),
        (PruneConfig(pattern="2:4", sparsity=0.3), {}, "2:4 is 50 %"),
        (PruneConfig(pattern="2:4"), {"d_model": 30, "n_heads": 3}, "divisible by 4"),
        (PruneConfig(method="wanda"), {}, "needs calibration text"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny_model, cfg, model_kw, message):
    model = tiny_model("llama", vocab_size=V, **model_kw)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        prune_model(model, cfg)
    assert "\n" not in str(e.value)


def test_unsupported_models_are_refused(tiny_model):
    with pytest.raises(ValueError, match="decoder models"):
        prune_model(tiny_model("bert", vocab_size=V), PruneConfig())
    quantized = quantize_model(tiny_model("llama", vocab_size=V), QuantConfig(method="int8"))
    with pytest.raises(ValueError, match="quantized: prune its float source"):
        prune_model(quantized, PruneConfig())
    with pytest.raises(ValueError, match="at most the model's 64 tokens"):
        prune_model(
            tiny_model("llama", vocab_size=V), PruneConfig(method="wanda"), CALIB.repeat(1, 3)
        )


@pytest.fixture
def model_dir(tiny_model, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer()
    save_model(tiny_model("llama", vocab_size=tok.vocab_size, n_kv_heads=2), tmp_path / "m", tok)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. 床前明月光，疑是地上霜。" * 40)
    return tmp_path / "m", ["--calib-data", str(text), "--calib.seq_len=16", "--calib.seqs=6"]


def test_the_command_writes_a_model_every_command_loads(model_dir, tmp_path, capsys):
    src, calib = model_dir
    out = tmp_path / "wanda"
    args = ["prune", str(src), "--method", "wanda", "--sparsity", "0.5", "--out", str(out)]
    assert main([*args, *calib]) == 0
    printed = capsys.readouterr().out
    assert "gains nothing from unstructured sparsity" in printed and f"written to {out}" in printed
    assert printed.splitlines()[-3].split()[-1] == "50.00%"  # the table's blocks total
    model = load_model(out)
    rows = [r for r in sparsity_report(model) if r["name"].startswith("blocks.")]
    assert rows and all(r["zeros"] == r["size"] // 2 for r in rows)
    assert main(["inspect", str(out)]) == 0
    gen = ["generate", "--model", str(out), "The", "--max-new-tokens", "4", "--temperature", "0"]
    assert main(gen) == 0
    assert main([*args, *calib]) == 2  # --out exists now
    capsys.readouterr()
    bad = ["prune", str(src), "--sparsity", "1.5", "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
