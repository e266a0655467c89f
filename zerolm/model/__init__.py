"""Models: presets and builders over shared blocks (build.py), and model directories (io.py).

A model directory holds `config.json` (the resolved model config), `model.safetensors` and the
tokenizer files. Models are built on the meta device, then initialised or loaded with
`load_state_dict(assign=True)` from memory-mapped safetensors (never pickles).
"""

from zerolm.model.build import build_model, model_class
from zerolm.model.io import load_model, load_state, read_model_config, save_model
from zerolm.model.presets import PRESETS, resolve
from zerolm.model.transformer import Transformer

__all__ = [
    "PRESETS",
    "Transformer",
    "build_model",
    "load_model",
    "load_state",
    "model_class",
    "read_model_config",
    "resolve",
    "save_model",
]
