"""`zerolm import`: a local Hugging Face checkpoint becomes a zerolm model directory."""

from __future__ import annotations

from pathlib import Path


def main(args, extra) -> None:
    from zerolm.interop.hf import import_hf

    out = args.out or f"runs/imported/{Path(args.src).resolve().name}"
    model = import_hf(args.src, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {model.cfg.preset} model ({n:,} parameters) to {out}")


def setup_arg_parser(sub) -> None:
    p = sub.add_parser(
        "import", help="make a local HF gpt2/llama checkpoint a zerolm model directory"
    )
    p.add_argument(
        "src", help="directory with config.json + model.safetensors (transformers layout)"
    )
    p.add_argument("--from", dest="source", choices=["hf"], default="hf")
    p.add_argument("--out", help="output model directory (default: runs/imported/NAME)")
    p.set_defaults(run=main)
