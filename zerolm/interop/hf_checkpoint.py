"""HF checkpoint directories: reading their safetensors weights (never pickles), building the
imported model, writing one; and the error for a config zerolm cannot express."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from zerolm.config import ModelConfig
from zerolm.files import atomic_save_tensors, atomic_write_bytes, atomic_write_text
from zerolm.model import load_state, save_model
from zerolm.tokenizer.hf_files import FILES as TOKENIZER_FILES


def _refuse(arch: str, problems: list[tuple[bool, str]]) -> None:
    bad = [msg for ok, msg in problems if not ok]
    if bad:
        raise ValueError(f"unsupported HF {arch} config: {'; '.join(bad)}")


def _read_weights(src: Path) -> dict:
    if (src / "model.safetensors").is_file():
        return load_file(str(src / "model.safetensors"))
    index = src / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for shard in sorted(
            set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        ):
            state.update(load_file(str(src / shard)))
        return state
    if list(src.glob("pytorch_model*.bin")):
        raise ValueError(
            f"{src} holds only pickled weights (pytorch_model.bin), which zerolm never loads "
            "(unpickling can run code); convert them to safetensors with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True)"
        )
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {src}")


def build_imported(
    cls, cfg: ModelConfig, state: dict, src: Path, out_dir=None, dtype: torch.dtype | None = None
):
    """The model of class `cls` holding an imported state (cast to dtype), in eval mode; with
    out_dir, also written there as a zerolm model directory with the source's tokenizer files."""
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = cls(cfg)
    load_state(model, state, f"HF checkpoint {src}")
    model.reset_buffers()
    model.eval()
    if out_dir is not None:
        save_model(model, out_dir)
        for name in TOKENIZER_FILES:  # the model's own tokenizer, roles and chat template
            if (Path(src) / name).is_file():
                atomic_write_bytes(Path(out_dir) / name, (Path(src) / name).read_bytes())
    return model


def write_hf_dir(out_dir, state: dict, config: dict, tokenizer=None) -> Path:
    """An HF checkpoint directory: model.safetensors, config.json (with the weights' dtype) and the
    tokenizer files, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = {**config, "torch_dtype": dtype, "dtype": dtype}
    atomic_save_tensors(out / "model.safetensors", state, metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    return out
