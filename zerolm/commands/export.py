"""`zerolm export`: a zerolm model directory becomes another tool's format: an HF transformers
directory, a GGUF file for llama.cpp, or an Ollama directory (the GGUF plus a Modelfile)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from zerolm.commands.common import model_arg, model_dir

FORMATS = ("hf", "gguf", "ollama")


def main(args, extra) -> None:
    from zerolm.model import load_model
    from zerolm.tokenizer import Tokenizer

    path = model_dir(args)
    if args.dtype is not None and args.format == "hf":
        raise ValueError("--dtype is for --format gguf or ollama; --format hf keeps the weights")
    model = load_model(path)
    tok = Tokenizer.load(path) if (Path(path) / "tokenizer.json").is_file() else None
    if args.format == "hf":
        _hf(model, tok, args.out)
    else:
        _gguf(model, tok, args.out, args.dtype, args.format, Path(path).name)


def _parameters(model) -> int:
    from zerolm.inspect.accounting import tensors

    return sum(n for n, _, _ in tensors(model).values())  # a quantized layer counts its N·K


def _dequantized(model):
    """transformers has no reader for zerolm's quantized layers: each becomes the nn.Linear (or
    nn.Embedding) of its dequantized float32 weights, in place."""
    import torch
    from torch import nn

    from zerolm.quant.linear import QuantEmbedding, quant_layers

    for name, q in quant_layers(model).items():
        with torch.device("meta"):
            new = (
                nn.Embedding(q.out_features, q.in_features)
                if isinstance(q, QuantEmbedding)
                else nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            )
        new.weight = nn.Parameter(q.weight.detach(), requires_grad=False)
        if q.bias is not None:
            new.bias = nn.Parameter(q.bias.detach().float(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    del model.zerolm_quant
    return model


def _hf(model, tok, out_dir) -> None:
    from zerolm.interop.hf import export_hf

    method = (getattr(model, "zerolm_quant", None) or {}).get("method")
    if method:
        model = _dequantized(model)
    out = export_hf(model, out_dir, tok)  # all or nothing: a failure leaves no `out`
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    n = _parameters(model)
    ids = ", ".join(f"{k.removesuffix('_token_id')} {config.get(k)}" for k in _ID_KEYS)
    what = "no tokenizer" if tok is None else f"its tokenizer ({ids})"
    template = tok is not None and (tok.layout == "zerolm" or tok.template is not None)
    print(
        f"exported {n:,} parameters as {config['architectures'][0]} to {out} with {what}"
        + ("; chat template included" if template else "")
    )
    if method:
        print(
            f"zerolm export: note: the {method} weights were written dequantized, as float32 "
            "(transformers reads no zerolm quantized layers; their rounding stays in the values); "
            "--format gguf keeps them quantized",
            file=sys.stderr,
        )


def _gguf(model, tok, out: str, dtype: str | None, fmt: str, name: str) -> None:
    from zerolm.files import atomic_dir
    from zerolm.interop.gguf_blocks import stored_types
    from zerolm.interop.gguf_export import DTYPES, export_gguf, gguf_arch

    quantized = getattr(model, "zerolm_quant", None) is not None
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    arch = gguf_arch(model.cfg)  # refuse before any directory is made
    if fmt == "gguf":
        written = export_gguf(model, out, tok, dtype, name=name)
        extra = ""
    else:
        from zerolm.interop.ollama import modelfile

        if tok is None:
            raise ValueError("--format ollama needs the model's tokenizer (tokenizer.json)")
        text = modelfile(tok, "model.gguf")  # before writing: a template it cannot express fails
        _ollama_dir(out)
        with atomic_dir(out) as tmp:
            export_gguf(model, tmp / "model.gguf", tok, dtype, name=name)
            (tmp / "Modelfile").write_text(text, encoding="utf-8")
        written = Path(out) / "model.gguf"
        extra = f" and {Path(out) / 'Modelfile'} (`ollama create NAME -f {out}/Modelfile`)"
    n = _parameters(model)
    if dtype is None:
        dtype = f"{stored_types(model)} blocks copied as stored" if quantized else "f16"
    template = tok is not None and (tok.layout == "zerolm" or tok.template is not None)
    what = "no tokenizer" if tok is None else "its tokenizer"
    what += "; chat template included" if template else ""
    print(
        f"exported {n:,} parameters as llama.cpp {arch} ({dtype}) to {written} "
        f"({written.stat().st_size:,} bytes){extra} with {what}"
    )


def _ollama_dir(out: str) -> None:
    """Writing DIR whole replaces it: only an empty folder or an earlier export may be replaced."""
    p = Path(out)
    if p.exists() and not (p.is_dir() and (not any(p.iterdir()) or (p / "Modelfile").is_file())):
        raise ValueError(
            f"{p} exists and is not an Ollama export: choose a new --out directory (it is written "
            "whole, replacing what was there)"
        )


_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def setup_arg_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model directory in another format (HF transformers, GGUF, Ollama)",
        description="write a zerolm model directory as an HF transformers directory (config.json, "
        "model.safetensors, the tokenizer with its chat template and special tokens, "
        "generation_config.json), as one GGUF file that llama.cpp runs (--format gguf), or as an "
        "Ollama directory: model.gguf plus a Modelfile (--format ollama)",
    )
    model_arg(p, "zerolm model directory")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="hf",
        help="hf: transformers directory; gguf: llama.cpp file; ollama: GGUF + Modelfile directory",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="gguf/ollama: the matrices' type, f32, f16 (default), bf16, q8_0, q4_0 or q4_1 (the "
        "q types quantise every matrix, embedding and output included; norms and biases stay "
        "f32). A quantized model is written as stored by default (its group-32 blocks copied); "
        "a --dtype re-encodes its dequantized weights",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output (hf, ollama: a directory; gguf: FILE.gguf), written whole, atomically",
    )
    p.set_defaults(run=main)
