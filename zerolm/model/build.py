"""Building a model from its config: the module class of each arch, freshly initialised."""

from __future__ import annotations

import torch

from zerolm.config import ModelConfig
from zerolm.model.bert import Bert
from zerolm.model.encdec import EncoderDecoder
from zerolm.model.presets import resolve
from zerolm.model.transformer import Transformer


def model_class(cfg: ModelConfig) -> type[Transformer] | type[Bert] | type[EncoderDecoder]:
    """The module class of a resolved config's arch: Transformer (decoder), Bert, EncoderDecoder."""
    if cfg.arch == "bert":
        return Bert
    if cfg.arch == "encdec":
        return EncoderDecoder
    return Transformer


def build_model(cfg: ModelConfig, vocab_size: int | None = None, seed: int = 0, device="cpu"):
    """A freshly initialised model of cfg's arch (deterministic for a given seed)."""
    cfg = resolve(cfg, vocab_size)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model.to_empty(device=device)
    model.reset_buffers()
    model.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(gen)
    return model
