"""Structured pruning: importance is the exact norm of a unit's contribution, removing units of
zero importance changes nothing, the smaller model saves, loads and decodes with its KV cache,
bad fractions are one-line errors, and `zerolm prune --method structured` recovers on the
Trainer."""

import copy

import pytest
import torch

from zerolm.cli import main
from zerolm.commands.prune import recover
from zerolm.config import PruneConfig, TrainConfig
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.model import load_model, read_model_config, save_model
from zerolm.transforms.prune import block_inputs
from zerolm.transforms.structured import importance, prune_structured

V = 64
IDS = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, V, (10, 24), generator=torch.Generator().manual_seed(2))
MODELS = [("llama", {"n_heads": 4, "n_kv_heads": 2}), ("gpt2", {})]


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def zero_units(model, channels: int, group: int | None):
    """Zero the first `channels` FFN channels of every block (their up/gate rows and down column)
    and, if given, kv group `group`'s o columns: units that contribute nothing."""
    for block in model.blocks:
        ffn, attn = block.ffn, block.attn
        for lin in (ffn.up, ffn.gate):
            if lin is not None:
                lin.weight[:channels] = 0
        ffn.down.weight[:, :channels] = 0
        if group is not None:
            width = attn.h // attn.kv * attn.dh
            attn.o.weight[:, group * width : (group + 1) * width] = 0
    return model


@pytest.mark.parametrize("preset, kw", MODELS)
def test_removing_zero_importance_units_changes_nothing(tiny_model, preset, kw):
    model = zero_units(tiny_model(preset, vocab_size=V, **kw).eval(), channels=32, group=1)
    c = model.cfg
    cfg = PruneConfig(
        method="structured", ffn_fraction=32 / c.d_ff, heads_fraction=1 / c.n_kv_heads
    )
    with torch.no_grad():
        before = model(IDS)
        prune_structured(model, cfg, CALIB)
        after = model(IDS)
    assert (model.cfg.d_ff, model.cfg.n_kv_heads) == (c.d_ff - 32, c.n_kv_heads - 1)
    assert model.cfg.n_heads == c.n_heads - c.n_heads // c.n_kv_heads
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # float rounding only


def test_zeroed_units_have_exactly_zero_importance(tiny_model):
    model = zero_units(tiny_model("llama", vocab_size=V, n_kv_heads=2).eval(), 32, group=0)
    x, kw = block_inputs(model, CALIB)
    ffn, groups = importance(model.blocks[0], x, kw)
    assert (ffn[:32] == 0).all() and (ffn[32:] > 0).all()
    assert groups[0] == 0 and groups[1] > 0


@pytest.mark.parametrize("preset, kw", MODELS)
def test_importance_is_the_norm_of_what_a_unit_adds(tiny_model, preset, kw):
    model = tiny_model(preset, vocab_size=V, **kw).eval()
    x, kw_ = block_inputs(model, CALIB)
    block = model.blocks[0]
    ffn_score, group_score = importance(block, x, kw_)
    with torch.no_grad():
        for c in (0, 7, 50):  # the block output without channel c differs by h_c ⊗ W_down[:, c]
            cut = copy.deepcopy(block)
            cut.ffn.down.weight[:, c] = 0
            diff = (block(x, **kw_) - cut(x, **kw_)).double().norm()
            assert float(diff) == pytest.approx(float(ffn_score[c]), rel=1e-4)
        attn, width = block.attn, block.attn.h // block.attn.kv * block.attn.dh
        h = block.norm1(x)
        for g in range(attn.kv):  # the attention output without group g differs by Y_g W_o,g^T
            cut = copy.deepcopy(attn)
            cut.o.weight[:, g * width : (g + 1) * width] = 0
            diff = (attn(h, **kw_) - cut(h, **kw_)).double().norm()
            assert float(diff) == pytest.approx(float(group_score[g]), rel=1e-4)


@pytest.mark.parametrize("preset, kw", MODELS)
def test_a_pruned_model_is_smaller_saves_loads_and_decodes(
    tiny_model, tiny_tokenizer, tmp_path, preset, kw
):
    model = tiny_model(preset, vocab_size=V, **kw).eval()
    before, d_ff = _params(model), model.cfg.d_ff
    cfg = PruneConfig(method="structured", ffn_fraction=0.25, heads_fraction=0.5)
    prune_structured(model, cfg, CALIB)
    c = model.cfg
    assert _params(model) < before and c.d_ff == d_ff - round(0.25 * d_ff)
    assert c.n_kv_heads == kw.get("n_kv_heads", 4) // 2
    assert c.n_heads == 2 and c.head_dim == 8  # the head size stays; d_model no longer = H·Dh
    save_model(model, tmp_path / "m")
    assert read_model_config(tmp_path / "m") == c
    loaded = load_model(tmp_path / "m")
    with torch.no_grad():
        logits = model(IDS)
        assert torch.equal(loaded(IDS), logits)
    req = GenerateRequest(max_new_tokens=6, sampling=SamplingParams(temperature=0))
    out = Engine(loaded).generate([IDS[0].tolist()], req)[0]
    ids = IDS[0].tolist()
    with torch.no_grad():  # KV-cache decode = full recomputation, token by token
        for t in out:
            assert t == int(loaded(torch.tensor([ids]))[0, -1].argmax())
            ids.append(t)


@pytest.mark.parametrize(
    "ffn, heads, message",
    [
        (0.25, 0.9, "would remove all 4 kv groups"),
        (0.25, 0.05, "rounds to none"),
        (1.0, 0.0, "must be in \\[0, 1\\)"),
        (-0.1, 0.0, "must be in \\[0, 1\\)"),
        (0.0, 0.0, "needs --ffn-fraction or --heads-fraction"),
    ],
)
def test_bad_fractions_are_one_line_errors(tiny_model, ffn, heads, message):
    cfg = PruneConfig(method="structured", ffn_fraction=ffn, heads_fraction=heads)
    with pytest.raises(ValueError, match=message) as e:
        prune_structured(tiny_model("gpt2", vocab_size=V), cfg, CALIB)
    assert "\n" not in str(e.value)


def test_unsupported_models_are_refused(tiny_model):
    cfg = PruneConfig(method="structured")
    with pytest.raises(ValueError, match="decoder models"):
        prune_structured(tiny_model("transformer", vocab_size=V), cfg, CALIB)


def test_recovery_trains_the_pruned_model_on_the_trainer(tiny_model):
    model = tiny_model("llama", vocab_size=V).eval()
    prune_structured(model, PruneConfig(method="structured", ffn_fraction=0.5), CALIB)
    ids = CALIB.repeat(2, 1)
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        first = float(loss(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()))
    train = TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup_steps=2, precision="fp32")
    row = recover(model, ids, train)
    assert row["step"] == 30 and not model.training
    with torch.no_grad():
        last = float(loss(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()))
    assert last < first - 0.1


def test_the_structured_command_end_to_end(tiny_model, tiny_tokenizer, tmp_path, capsys):
    tok = tiny_tokenizer()
    src, out = tmp_path / "m", tmp_path / "small"
    save_model(tiny_model("llama", vocab_size=tok.vocab_size, n_kv_heads=2), src, tok)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. 床前明月光，疑是地上霜。" * 40)
    args = ["prune", str(src), "--method", "structured", "--ffn-fraction", "0.25"]
    args += ["--heads-fraction", "0.5", "--recover-steps", "3", "--out", str(out)]
    args += ["--calib-data", str(text), "--calib.seq_len=16", "--calib.seqs=6"]
    assert main([*args, "--train.batch_size=2", "--train.precision=fp32"]) == 0
    printed = capsys.readouterr().out
    assert "(d_ff 72, 2 heads / 1 kv)" in printed and "recovery: 3 steps" in printed
    assert load_model(out).cfg.d_ff == 72
    assert main(["inspect", str(out)]) == 0
    gen = ["generate", "--model", str(out), "The", "--max-new-tokens", "4", "--temperature", "0"]
    assert main(gen) == 0
    capsys.readouterr()
    bad = ["prune", str(src), "--method", "structured", "--heads-fraction", "1.0"]
    assert main([*bad, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "heads_fraction" in err and "\n" not in err
