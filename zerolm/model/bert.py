"""BERT: a bidirectional Transformer encoder with masked-LM, next-sentence and classification heads.

Legend: B batch, T tokens, D d_model, V vocabulary, C classes (n_labels), Dh head size.
Internal parameter names (HF names live in interop/hf_bert.py):
  tok_emb, pos_emb, seg_emb, emb_norm, blocks.{i}.{attn.{q,k,v,o},norm1,ffn.{up,down},norm2},
  norm_f (pre-norm only), mlm.{dense,norm,bias,out (untied only)}, pooler, nsp,
  classifier (n_labels > 0)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zerolm.model.layers import make_norm, position_buffers
from zerolm.model.presets import ResolvedModelConfig
from zerolm.model.transformer import Block

# the MLM head's activation for each FFN kind (SwiGLU has no single-matrix form: exact GELU, as
# BERT)
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_erf": F.gelu,
    "swiglu": F.gelu,
}


class MLMHead(nn.Module):
    """dense -> activation -> norm -> decoder (the token embedding when tied) + a bias per token."""

    def __init__(self, cfg: ResolvedModelConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.ffn]
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.out = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, tok_emb: torch.Tensor):  # (..., D) -> (..., V)
        h = self.norm(self.act(self.dense(x)))
        weight = tok_emb if self.out is None else self.out.weight  # (V, D)
        return F.linear(h, weight, self.bias)


class Bert(nn.Module):
    # the non-learned position tables position_buffers registers (per cfg.position)
    pos_table: torch.Tensor  # (max_seq_len, D), sinusoidal
    rope_cos: torch.Tensor  # (max_seq_len, Dh), rope; likewise rope_sin
    rope_sin: torch.Tensor

    def __init__(self, cfg: ResolvedModelConfig):
        """`cfg` must be resolved (zerolm.model.presets.resolve) with arch bert."""
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d) if cfg.position == "learned" else None
        self.seg_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = make_norm(cfg.norm, d, cfg.norm_eps, cfg.bias) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = (
            make_norm(cfg.norm, d, cfg.norm_eps, cfg.bias) if cfg.norm_placement == "pre" else None
        )
        self.mlm = MLMHead(cfg)
        self.pooler = nn.Linear(d, d, bias=cfg.bias)
        self.nsp = nn.Linear(d, 2, bias=cfg.bias)
        self.classifier = nn.Linear(d, cfg.n_labels, bias=cfg.bias) if cfg.n_labels > 0 else None
        self.reset_buffers()

    def reset_buffers(self):
        """(Re)compute the non-learned tables; call after moving off the meta device."""
        position_buffers(self, self.cfg)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None):
        """BERT initialisation: N(0, 0.02) for matrices and embeddings, zero biases, unit norms."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                (p.fill_(1.0) if name.endswith("weight") else p.zero_())
            else:
                p.normal_(0.0, 0.02, generator=generator)

    # ------------------------------------------------------------------ encoder
    def hidden(self, ids, segments=None, attention_mask=None):
        """ids (B, T) -> final hidden states (B, T, D). segments: (B, T) sentence A/B ids (default
        0); attention_mask: (B, T), 1/True for real tokens, 0/False for padding (default: all real).
        Padding never changes the real tokens' states: no token attends to a padded key."""
        cfg = self.cfg
        T = ids.shape[1]
        if ids.shape[1] > cfg.max_seq_len:
            raise ValueError(
                f"sequence of {T} tokens exceeds the model's max_seq_len={cfg.max_seq_len}: "
                f"truncate inputs to {cfg.max_seq_len} tokens (including [CLS] and [SEP])"
            )
        if attention_mask is None:
            keep = torch.ones(1, T, dtype=torch.bool, device=ids.device)
        else:
            keep = attention_mask.bool()  # (B, T)
            keep = keep | ~keep.any(
                -1, keepdim=True
            )  # an all-padding row attends everywhere: finite, unused
        mask = keep[:, None, None, :]  # (B|1, 1, 1, T): allowed keys, in both directions
        x = self.tok_emb(ids)  # (B, T, D)
        if cfg.embed_scale:
            x = x * math.sqrt(cfg.d_model)
        positions = torch.arange(T, device=ids.device)
        if cfg.position == "learned":
            x = x + self.pos_emb(positions)
        elif cfg.position == "sinusoidal":
            x = x + self.pos_table[:T]
        x = x + self.seg_emb(torch.zeros_like(ids) if segments is None else segments)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        rope = None
        if cfg.position == "rope":
            rope = (
                self.rope_cos[None, None, :T].to(x.dtype),
                self.rope_sin[None, None, :T].to(x.dtype),
            )  # (1, 1, T, Dh)
        for block in self.blocks:
            x = block(x, rope=rope, mask=mask)
        return x if self.norm_f is None else self.norm_f(x)

    # ------------------------------------------------------------------ heads
    def mlm_logits(self, hidden):
        """Hidden states (..., D) -> masked-LM logits (..., V); pass only the masked positions to
        save work."""
        return self.mlm(hidden, self.tok_emb.weight)

    def pooled(self, hidden):
        """(B, T, D) -> (B, D): tanh(dense(h_[CLS])), the input of the NSP and classification
        heads."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def nsp_logits(self, hidden):
        """(B, T, D) -> (B, 2) next-sentence logits (0: B follows A, 1: B is random, as in BERT)."""
        return self.nsp(self.pooled(hidden))

    def classify_logits(self, hidden):
        """(B, T, D) -> (B, C) sequence-classification logits (dropout on the pooled output in
        training)."""
        if self.classifier is None:
            raise ValueError(
                "this bert model has no classification head: build it with --model.n_labels=C "
                "(C classes)"
            )
        return self.classifier(self.drop(self.pooled(hidden)))

    def embed(self, hidden, attention_mask=None):
        """(B, T, D) -> (B, D) sentence embeddings: the mean over real tokens, L2-normalised
        (sentence-transformers' mean pooling + Normalize)."""
        if attention_mask is None:
            mean = hidden.mean(1)
        else:
            m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
            mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=-1)

    def forward(self, ids, segments=None, attention_mask=None):
        """ids (B, T) -> (MLM logits (B, T, V), NSP logits (B, 2))."""
        h = self.hidden(ids, segments, attention_mask)
        return self.mlm_logits(h), self.nsp_logits(h)
