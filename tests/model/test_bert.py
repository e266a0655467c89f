"""The BERT encoder: padding invariance, bidirectionality, heads, init, save/load, accounting."""

import pytest
import torch
import torch.nn.functional as F

from zerolm.config import ModelConfig
from zerolm.inspect.accounting import account, format_account
from zerolm.model import build_model, load_model, save_model

V, PAD = 97, 0
VARIANTS = {
    "bert": dict(),
    "bert-sinusoidal-untied": dict(position="sinusoidal", tie_embeddings=False),
    "bert-rope-prenorm-gqa": dict(
        position="rope", norm_placement="pre", n_kv_heads=2, ffn="swiglu"
    ),
}


def make(name="bert", **over):
    kw = (
        dict(preset="bert", d_model=32, n_layers=2, n_heads=4, max_seq_len=24, n_labels=3)
        | VARIANTS[name]
        | over
    )
    return build_model(ModelConfig(**kw), vocab_size=V, seed=0).eval()


def _ids(batch, length, seed=1):
    return torch.randint(1, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _outputs(model, ids, segments, mask):
    h = model.hidden(ids, segments, mask)
    return dict(
        hidden=h,
        mlm=model.mlm_logits(h),
        pooled=model.pooled(h),
        nsp=model.nsp_logits(h),
        classify=model.classify_logits(h),
        embed=model.embed(h, mask),
    )


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_padding_never_changes_real_tokens_outputs(name):
    model = make(name)
    lengths = [14, 9, 3]
    rows = [_ids(1, n, seed=n)[0] for n in lengths]
    segs = [torch.tensor([0] * (n // 2) + [1] * (n - n // 2)) for n in lengths]
    T = max(lengths)
    ids = torch.full((len(rows), T), PAD)
    seg = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, segs)):
        ids[i, : len(r)], seg[i, : len(r)], mask[i, : len(r)] = r, s, True
    batched = _outputs(model, ids, seg, mask)
    for i, (r, s) in enumerate(zip(rows, segs)):
        alone = _outputs(model, r[None], s[None], None)
        n = len(r)
        for key in ("hidden", "mlm"):
            torch.testing.assert_close(
                batched[key][i, :n], alone[key][0], atol=1e-5, rtol=1e-5, msg=key
            )
        for key in ("pooled", "nsp", "classify", "embed"):
            torch.testing.assert_close(
                batched[key][i], alone[key][0], atol=1e-5, rtol=1e-5, msg=key
            )
    # different pad contents under the mask change nothing either
    noisy = torch.where(mask, ids, _ids(3, T, seed=9))
    torch.testing.assert_close(model.hidden(noisy, seg, mask)[mask], batched["hidden"][mask])


@torch.no_grad()
def test_bidirectional_and_segments_matter():
    model = make()
    ids = _ids(2, 12)
    h = model.hidden(ids)
    later = ids.clone()
    later[:, -1] = (later[:, -1] % (V - 1)) + 1
    assert (
        model.hidden(later)[:, 0] - h[:, 0]
    ).abs().max() > 1e-4  # a later token changes the first output
    seg = torch.ones_like(ids)
    assert (model.hidden(ids, seg) - h).abs().max() > 1e-4
    torch.testing.assert_close(
        model.hidden(ids, torch.zeros_like(ids)), h
    )  # default segments are 0


@torch.no_grad()
def test_heads_shapes_embed_and_all_padding_row():
    model = make()
    ids = _ids(2, 10)
    mlm, nsp = model(ids)
    assert mlm.shape == (2, 10, V) and nsp.shape == (2, 2)
    h = model.hidden(ids)
    assert model.mlm_logits(h[:, 3]).shape == (2, V)  # any leading shape: only the masked positions
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6])
    e = model.embed(h, mask)
    torch.testing.assert_close(e[1], F.normalize(h[1, :4].mean(0), dim=0))
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    empty = model.hidden(ids, attention_mask=torch.zeros(2, 10, dtype=torch.bool))
    assert torch.isfinite(empty).all()
    with pytest.raises(ValueError, match="no classification head.*n_labels"):
        make(n_labels=0).classify_logits(h)


def test_too_long_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=24: truncate"):
        make().hidden(_ids(1, 25))


def test_init_and_dropout():
    model = make(dropout=0.1)
    named = dict(model.named_parameters())
    assert torch.all(named["mlm.bias"] == 0) and torch.all(named["blocks.0.attn.q.bias"] == 0)
    assert torch.all(named["emb_norm.weight"] == 1) and torch.all(named["mlm.norm.weight"] == 1)
    for name in ("tok_emb.weight", "pooler.weight", "blocks.1.ffn.down.weight"):
        assert abs(named[name].std().item() - 0.02) < 0.004, name
    ids = _ids(2, 10)
    with torch.no_grad():
        assert torch.equal(model.hidden(ids), model.hidden(ids))  # eval: deterministic
        model.train()
        assert not torch.equal(model.hidden(ids), model.hidden(ids))


def test_save_load_round_trip(tmp_path):
    model = make("bert-sinusoidal-untied")
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded).__name__ == "Bert" and loaded.cfg == model.cfg
    ids = _ids(2, 10)
    with torch.no_grad():
        for a, b in zip(model(ids), loaded(ids)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_inspect_accounts_bert(tmp_path, capsys):
    from zerolm.cli import main

    model = make(n_labels=0)
    a = account(model)
    assert a["total"] == sum(p.numel() for p in model.parameters()) == sum(a["parameters"].values())
    assert a["parameters"]["positions"] == (24 + 2) * 32  # learned positions + 2 segment rows
    assert a["kv_cache_bytes"] == 0 and "no KV cache" in format_account(a, model.cfg)
    save_model(model, tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m")]) == 0
    assert "bert preset bert" in capsys.readouterr().out
