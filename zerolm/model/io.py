"""Model directories: save, read the config of, and load a model (any arch).

A model directory holds `config.json` (the resolved model config), `model.safetensors` and the
tokenizer files. Models are built on the meta device, then initialised or loaded with
`load_state_dict(assign=True)` from memory-mapped safetensors (never pickles).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from zerolm.config import ModelConfig
from zerolm.files import atomic_save_tensors, atomic_write_text
from zerolm.model.build import model_class
from zerolm.model.presets import ResolvedModelConfig, resolve
from zerolm.model.protocol import SavableModel
from zerolm.quant.linear import apply_quant_layout


def save_model(model: SavableModel, out_dir: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) into out_dir, atomically per
    file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_save_tensors(out / "model.safetensors", state, metadata={"format": "pt"})
    config = {"zerolm_model": dataclasses.asdict(model.cfg)}
    quant = getattr(model, "zerolm_quant", None)
    if quant is not None:  # which layers are stored quantized, and how (zerolm/quant)
        config["zerolm_quant"] = quant
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def read_model_config(model_dir: str | Path) -> ResolvedModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"no model at {str(model_dir)!r}: expected config.json + model.safetensors "
            "(train one with `zerolm pretrain`, or `zerolm import --from hf DIR`)"
        )
    raw = json.loads(path.read_text(encoding="utf-8"))
    if "zerolm_model" not in raw:
        raise ValueError(
            f"{path} is not a zerolm model config; for a transformers checkpoint run "
            f"`zerolm import --from hf {model_dir}`"
        )
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return resolve(ModelConfig(**{k: v for k, v in raw["zerolm_model"].items() if k in fields}))


def read_quant_meta(model_dir: str | Path) -> dict | None:
    """The quantization record of a model directory (zerolm/quant/linear.py), or None."""
    raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return raw.get("zerolm_quant")


def load_state(
    model: nn.Module, state: dict, source: str = "checkpoint", assign: bool = True
) -> None:
    """load_state_dict with an error that names mismatched tensors. assign=True adopts the given
    tensors (loading onto the meta device); assign=False copies into existing parameters (which
    keeps an optimizer's references valid)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or extra or shapes:
        detail = "; ".join(
            filter(
                None,
                [
                    f"missing {missing[:4]}" if missing else "",
                    f"unexpected {extra[:4]}" if extra else "",
                    f"shape mismatch {shapes[:4]}" if shapes else "",
                ],
            )
        )
        raise ValueError(
            f"{source} does not fit this model config ({detail}); "
            "use the config the checkpoint was trained with"
        )
    model.load_state_dict(state, strict=True, assign=assign)


def load_model(model_dir: str | Path, device="cpu", dtype=None):
    """Load a zerolm model directory (any arch; quantized layers as saved). `dtype` casts the
    float tensors only: a quantized layer's codes and scales stay as stored."""
    cfg = read_model_config(model_dir)
    quant = read_quant_meta(model_dir)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    if quant is not None:
        apply_quant_layout(model, quant)
    state = load_file(str(Path(model_dir) / "model.safetensors"), device=str(device))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_state(model, state, f"{model_dir}/model.safetensors")
    model.reset_buffers()
    return model.to(device).eval()
