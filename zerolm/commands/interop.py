"""`zerolm import`: a local Hugging Face checkpoint or a llama.cpp GGUF file becomes a zerolm model
directory."""

from __future__ import annotations

import time
from pathlib import Path

from zerolm.commands.inspect import tokenizer_line
from zerolm.model.presets import head_size


def summary(model, tok, out: str, seconds: float) -> str:
    """One line: parameters, architecture, the tokenizer's roles and its chat template."""
    c = model.cfg
    n = sum(p.numel() for p in model.parameters())
    heads = f"{c.n_heads} heads" + (f" / {c.n_kv_heads} kv" if c.n_kv_heads != c.n_heads else "")
    shape = (
        f"{c.preset} {c.arch}: {c.n_layers} layers, d {c.d_model}, {heads}, head_dim "
        f"{head_size(c)}, vocab {c.vocab_size:,}, window {c.max_seq_len:,}"
        + (", tied head" if getattr(c, "tie_embeddings", False) else "")
    )
    words = (
        "no tokenizer (add tokenizer.json to the directory)" if tok is None else tokenizer_line(tok)
    )
    return f"imported {n:,} parameters ({shape}) to {out} in {seconds:.1f} s; {words}"


def main(args, extra) -> None:
    from zerolm.tokenizer import Tokenizer

    start = time.perf_counter()
    src = Path(args.src).resolve()
    out = args.out or f"runs/imported/{src.stem if args.source == 'gguf' else src.name}"
    if args.source == "gguf":  # all or nothing: a failure leaves no `out`
        from zerolm.interop.gguf_import import import_gguf

        model = import_gguf(args.src, out)
    else:
        from zerolm.interop.hf import import_hf

        model = import_hf(args.src, out)
    seconds = time.perf_counter() - start
    tok = Tokenizer.load(out) if (Path(out) / "tokenizer.json").is_file() else None
    print(summary(model, tok, out, seconds))


def setup_arg_parser(sub) -> None:
    p = sub.add_parser(
        "import",
        help="make a local HF checkpoint (decoder, BERT, Marian) or GGUF file a zerolm model "
        "directory",
        description="make a local HF checkpoint or llama.cpp GGUF file (llama, mistral, qwen2, "
        "qwen3, gpt2) a zerolm model directory, with its tokenizer, special tokens and chat "
        "template; prints one line saying what was imported",
    )
    p.add_argument(
        "src",
        help="directory with config.json + model.safetensors (transformers layout), or with "
        "--from gguf a .gguf file",
    )
    p.add_argument("--from", dest="source", choices=["hf", "gguf"], default="hf")
    p.add_argument("--out", help="output model directory (default: runs/imported/NAME)")
    p.set_defaults(run=main)
