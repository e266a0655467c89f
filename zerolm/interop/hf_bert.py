"""Import and export HF transformers BERT checkpoints (model_type "bert") as zerolm Bert models.

Imports BertForPreTraining (`bert.` + `cls.predictions` / `cls.seq_relationship`), headless
BertModel (no prefix: sentence-transformers models such as all-MiniLM-L6-v2) and
BertForSequenceClassification (`classifier`) checkpoints; heads a checkpoint lacks are initialised
fresh with a warning, as transformers does. Exports BertForPreTraining (+ `classifier` when the
model has one). HF names live only here; reached through zerolm.interop.hf's import_hf / export_hf,
which dispatch on model_type.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch

from zerolm.config import ModelConfig
from zerolm.interop.hf_checkpoint import _read_weights, _refuse, build_imported, write_hf_dir
from zerolm.model import build_model, resolve
from zerolm.model.bert import Bert
from zerolm.model.presets import ResolvedModelConfig

log = logging.getLogger("zerolm")

# zerolm module -> HF module; each maps its .weight and .bias (mlm.bias is a bare parameter)
KEYS = {
    "tok_emb": "bert.embeddings.word_embeddings",
    "pos_emb": "bert.embeddings.position_embeddings",
    "seg_emb": "bert.embeddings.token_type_embeddings",
    "emb_norm": "bert.embeddings.LayerNorm",
    **{
        f"blocks.{{i}}.attn.{z}": f"bert.encoder.layer.{{i}}.attention.self.{h}"
        for z, h in (("q", "query"), ("k", "key"), ("v", "value"))
    },
    "blocks.{i}.attn.o": "bert.encoder.layer.{i}.attention.output.dense",
    "blocks.{i}.norm1": "bert.encoder.layer.{i}.attention.output.LayerNorm",
    "blocks.{i}.ffn.up": "bert.encoder.layer.{i}.intermediate.dense",
    "blocks.{i}.ffn.down": "bert.encoder.layer.{i}.output.dense",
    "blocks.{i}.norm2": "bert.encoder.layer.{i}.output.LayerNorm",
    "pooler": "bert.pooler.dense",
    "mlm.dense": "cls.predictions.transform.dense",
    "mlm.norm": "cls.predictions.transform.LayerNorm",
    "mlm.out": "cls.predictions.decoder",
    "nsp": "cls.seq_relationship",
    "classifier": "classifier",
}
BARE = {"mlm.bias": "cls.predictions.bias"}
HEADS = (
    "bert.",
    "cls.",
    "classifier.",
)  # prefixes of a full checkpoint; a headless BertModel has none
IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")  # HF buffers
# the bias HF's forward adds; tied to cls.predictions.bias unless tie_word_embeddings is false
DECODER_BIAS = "cls.predictions.decoder.bias"
FRESH_OK = (
    "mlm.",
    "nsp.",
    "pooler.",
    "classifier.",
)  # heads that may be missing: initialised fresh

DEFAULTS = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    position_embedding_type="absolute",
    tie_word_embeddings=True,
    is_decoder=False,
    add_cross_attention=False,
)
ACT: dict[str, Literal["relu", "gelu", "gelu_erf"]] = {
    "gelu": "gelu_erf",
    "relu": "relu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
}  # HF -> zerolm ffn
# what BertForPreTraining fixes: a zerolm bert model must take one of these values to be exported
REQUIRED = dict(
    norm=("layernorm",),
    norm_placement=("post",),
    position=("learned",),
    ffn=("gelu_erf", "gelu", "relu"),
    bias=(True,),
    embed_norm=(True,),
    embed_scale=(False,),
)


# ------------------------------------------------------------------ config


def _from_hf(raw: dict, n_labels: int) -> ModelConfig:
    c = {**DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    act, pos = c["hidden_act"], c["position_embedding_type"]
    _refuse(
        "bert",
        [
            (act in ACT, f"hidden_act={act!r} (supported: {', '.join(ACT)})"),
            (pos == "absolute", f"position_embedding_type={pos!r} (only 'absolute' is supported)"),
            (not c["is_decoder"], "is_decoder=true (zerolm's bert is an encoder)"),
            (not c["add_cross_attention"], "add_cross_attention=true"),
        ],
    )
    return ModelConfig(
        arch="bert",
        preset="bert",
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        d_ff=c["intermediate_size"],
        max_seq_len=c["max_position_embeddings"],
        ffn=ACT[act],
        norm_eps=float(c["layer_norm_eps"]),
        dropout=float(c["hidden_dropout_prob"]),
        type_vocab_size=c["type_vocab_size"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        n_labels=n_labels,
    )


def _to_hf(cfg: ModelConfig, pad_id: int | None) -> dict:
    to_hf: dict[str, str] = {v: k for k, v in reversed(ACT.items())}
    act = to_hf[cfg.ffn]  # gelu_erf -> gelu, gelu -> gelu_new  # gelu_erf -> gelu, gelu -> gelu_new
    out = dict(
        architectures=["BertForPreTraining"],
        model_type="bert",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
        hidden_act=act,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps,
        position_embedding_type="absolute",
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=pad_id,
    )
    if cfg.n_labels:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.n_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.n_labels)}
    return out


# ------------------------------------------------------------------ weights


def _names(n_layers: int) -> dict[str, str]:
    """Every zerolm parameter name -> its HF name."""
    out = dict(BARE)
    for z, h in KEYS.items():
        for i in range(n_layers) if "{i}" in z else [0]:
            for s in ("weight", "bias"):
                out[f"{z.format(i=i)}.{s}"] = f"{h.format(i=i)}.{s}"
    return out


def _hf_name(name: str) -> str:
    """A checkpoint name in the BertForPreTraining spelling: `bert.` added to a headless model's
    names, TF-era LayerNorm gamma/beta renamed."""
    if not name.startswith(HEADS):
        name = f"bert.{name}"
    if name.endswith((".gamma", ".beta")):
        name = name.rsplit(".", 1)[0] + (".weight" if name.endswith(".gamma") else ".bias")
    return name


def _from_hf_state(hf_state: dict, cfg: ModelConfig) -> dict:
    inverse = {h: z for z, h in _names(cfg.n_layers).items()}
    state, unknown = {}, []
    for name, t in hf_state.items():
        name = _hf_name(name)
        if name.endswith(IGNORED) or name == DECODER_BIAS:
            continue
        if name in inverse:
            state[inverse[name]] = t
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"HF bert checkpoint has tensors zerolm cannot place: {unknown[:6]}")
    if DECODER_BIAS in hf_state:  # the bias HF's forward adds, where a file has both
        state["mlm.bias"] = hf_state[DECODER_BIAS]
    if cfg.tie_embeddings:
        state.pop(
            "mlm.out.weight", None
        )  # a tied decoder is the embedding; old files store it anyway
    return state


def _fill_missing_heads(state: dict, cfg: ResolvedModelConfig, src: Path) -> dict:
    """Heads absent from the checkpoint (a BertModel has no MLM/NSP head), freshly initialised."""
    with torch.device("meta"):
        expected = Bert(cfg).state_dict()
    missing = sorted(k for k in expected if k not in state and k.startswith(FRESH_OK))
    if not missing:
        return state
    log.warning(
        "%s has no %s weights: initialised fresh (BERT init); train them before using their "
        "outputs",
        src,
        ", ".join(sorted({k.split(".")[0] for k in missing})),
    )
    fresh = build_model(cfg, seed=0).state_dict()
    return state | {k: fresh[k] for k in missing}


# ------------------------------------------------------------------ public API


def import_hf(
    src: Path, raw: dict, out_dir=None, dtype: torch.dtype | None = torch.float32
) -> Bert:
    """Load an HF BERT checkpoint directory as a zerolm Bert (see zerolm.interop.hf.import_hf)."""
    hf_state = _read_weights(src)
    classifier = hf_state.get("classifier.weight")
    cfg = resolve(_from_hf(raw, 0 if classifier is None else classifier.shape[0]))
    state = _fill_missing_heads(_from_hf_state(hf_state, cfg), cfg, src)
    pooling = src / "1_Pooling" / "config.json"  # sentence-transformers' pooling choice
    if pooling.is_file() and not json.loads(pooling.read_text(encoding="utf-8")).get(
        "pooling_mode_mean_tokens"
    ):
        log.warning(
            "%s pools sentence embeddings other than by the mean; `zerolm embed` mean-pools", src
        )
    return build_imported(Bert, cfg, state, src, out_dir, dtype)


def export_hf(model: Bert, out_dir, tokenizer=None) -> Path:
    """Write `model` as an HF BertForPreTraining checkpoint directory (config.json +
    model.safetensors [+ tokenizer]); a model whose choices BERT cannot express raises
    ValueError."""
    cfg = model.cfg
    bad = [
        f"{k}={getattr(cfg, k)!r} (needs {' or '.join(map(repr, ok))})"
        for k, ok in REQUIRED.items()
        if getattr(cfg, k) not in ok
    ]
    if cfg.n_kv_heads != cfg.n_heads:
        bad.append(
            f"n_kv_heads={cfg.n_kv_heads} (BERT has no grouped-query attention: needs "
            f"{cfg.n_heads})"
        )
    if bad:
        raise ValueError(
            f"cannot export this {cfg.preset!r} bert model as HF BertForPreTraining: "
            f"{'; '.join(bad)}"
        )
    names = _names(cfg.n_layers)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if stray := sorted(set(state) - set(names)):
        raise ValueError(
            f"model has tensors outside the plain bert architecture ({stray[:4]}): "
            "merge adapters / dequantize it before exporting"
        )
    state = {names[k]: t.contiguous().cpu() for k, t in state.items()}
    state[DECODER_BIAS] = state[BARE["mlm.bias"]].clone()  # read by HF when the head is untied
    pad_id = tokenizer.pad_id if tokenizer is not None else None  # no tokenizer: ids unknown
    return write_hf_dir(out_dir, state, _to_hf(cfg, pad_id), tokenizer)
