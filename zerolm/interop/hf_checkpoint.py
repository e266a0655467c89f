"""HF checkpoint directories: reading their safetensors weights (never pickles), building the
imported model, writing one; and the error for a config zerolm cannot express."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from zerolm.config import ModelConfig
from zerolm.files import atomic_dir, atomic_save_tensors, atomic_write_bytes, atomic_write_text
from zerolm.model import load_state, save_model
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.hf_files import FILES as TOKENIZER_FILES

ROLE_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # HF config keys of token roles


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
    out_dir, also written there as a zerolm model directory with the source's tokenizer files
    (all or nothing: a failure, e.g. a decoder tokenizer without an eos, leaves no out_dir)."""
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = cls(cfg)
    load_state(model, state, f"HF checkpoint {src}")
    model.reset_buffers()
    model.eval()
    if out_dir is not None:
        if Path(out_dir).resolve() == Path(src).resolve():
            raise ValueError(f"--out {out_dir} is the checkpoint itself: choose another directory")
        with atomic_dir(_replaceable(out_dir)) as tmp:
            save_model(model, tmp)
            _copy_tokenizer(Path(src), tmp, check=cfg.arch == "decoder")
    return model


def _copy_tokenizer(src: Path, out: Path, check: bool) -> None:
    """The source's tokenizer files, unchanged; an HF config.json's token ids become a
    generation_config.json where the source has none (the zerolm config.json replaces it).
    check: load the result, so a tokenizer zerolm cannot use fails the import, not a later run."""
    for name in TOKENIZER_FILES:  # the model's own tokenizer, roles and chat template
        if (src / name).is_file():
            atomic_write_bytes(out / name, (src / name).read_bytes())
    if (out / "tokenizer.json").is_file() and not (out / "generation_config.json").is_file():
        raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
        ids = {k: raw[k] for k in ROLE_IDS if raw.get(k) is not None}
        if ids:
            atomic_write_text(out / "generation_config.json", json.dumps(ids, indent=2))
    if check and (out / "tokenizer.json").is_file():
        Tokenizer.load(out)


def _replaceable(out_dir) -> Path:
    """out_dir, if writing it whole may replace what is there: nothing, an empty directory, or a
    model directory (config.json); anything else is a ValueError (never delete a user's files)."""
    out = Path(out_dir)
    if out.exists() and not (
        out.is_dir() and (not any(out.iterdir()) or (out / "config.json").is_file())
    ):
        raise ValueError(
            f"{out} exists and is not a model directory: choose a new output directory (it is "
            "written whole, replacing what was there)"
        )
    return out


def role_ids(tok) -> dict:
    """config.json's token ids from the tokenizer's roles (None without a tokenizer)."""
    if tok is None:
        return dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    eos = list(tok.eos_ids)
    return dict(
        pad_token_id=tok.pad_id if eos or tok.roles.pad is not None else None,
        bos_token_id=tok.bos_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos or None,
    )


def generation_config(tok) -> dict:
    """A decoder's generation_config.json: its roles, generation ending at every chat stop (the
    end of turn too, as zerolm chat stops); none where the tokenizer brings its own file."""
    if tok is None or "generation_config.json" in tok.files:
        return {}
    ids = role_ids(tok)
    stops = list(tok.stop_ids)
    ids["eos_token_id"] = stops[0] if len(stops) == 1 else stops or None
    return {"generation_config.json": {k: v for k, v in ids.items() if v is not None}}


def write_hf_dir(
    out_dir, state: dict, config: dict, tokenizer=None, extra: dict | None = None
) -> Path:
    """An HF checkpoint directory, all or nothing (a failure leaves no out_dir): model.safetensors,
    config.json (with the weights' dtype), the tokenizer files and `extra` {file name: JSON}."""
    out = _replaceable(out_dir)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = {**config, "torch_dtype": dtype, "dtype": dtype}
    with atomic_dir(out) as tmp:
        atomic_save_tensors(tmp / "model.safetensors", state, metadata={"format": "pt"})
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, value in (extra or {}).items():
            atomic_write_text(tmp / name, json.dumps(value, indent=2))
    return out
