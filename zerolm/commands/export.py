"""`zerolm export`: a zerolm model directory becomes another tool's format (today: an HF
transformers directory; GGUF and Ollama come with the GGUF work)."""

from __future__ import annotations

import json
from pathlib import Path

from zerolm.commands.common import model_arg, model_dir

FORMATS = ("hf", "gguf", "ollama")  # gguf and ollama: the next issue (llama.cpp / Ollama)


def main(args, extra) -> None:
    from zerolm.interop.hf import export_hf
    from zerolm.model import load_model
    from zerolm.tokenizer import Tokenizer

    path = model_dir(args)
    if args.format != "hf":
        raise ValueError(
            f"--format {args.format} is not available yet: GGUF and Ollama export come with the "
            "GGUF work; use --format hf (an HF transformers directory, which llama.cpp's "
            "convert_hf_to_gguf.py also reads)"
        )
    model = load_model(path)
    tok = Tokenizer.load(path) if (Path(path) / "tokenizer.json").is_file() else None
    out = export_hf(model, args.out, tok)  # all or nothing: a failure leaves no `out`
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    n = sum(p.numel() for p in model.parameters())
    ids = ", ".join(f"{k.removesuffix('_token_id')} {config.get(k)}" for k in _ID_KEYS)
    what = "no tokenizer" if tok is None else f"its tokenizer ({ids})"
    template = tok is not None and (tok.layout == "zerolm" or tok.template is not None)
    print(
        f"exported {n:,} parameters as {config['architectures'][0]} to {out} with {what}"
        + ("; chat template included" if template else "")
    )


_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def setup_arg_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model directory in another format (HF transformers)",
        description="write a zerolm model directory as an HF transformers directory (config.json, "
        "model.safetensors, the tokenizer with its chat template and special tokens, "
        "generation_config.json) that AutoModelForCausalLM and AutoTokenizer load",
    )
    model_arg(p, "zerolm model directory")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="hf",
        help="hf: transformers (gguf and ollama come with the GGUF work)",
    )
    p.add_argument("--out", required=True, help="output directory (written whole, atomically)")
    p.set_defaults(run=main)
