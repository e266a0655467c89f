"""`zerolm quantize`: a float model directory becomes a quantized one ([quant] and [calib] config
sections), which every other command loads as it is (zerolm/quant, transforms/quantize.py)."""

from __future__ import annotations

import time
from pathlib import Path

from zerolm.commands.common import add_recipe_args, alias, model_arg, model_dir, resolve_config


def _check_out(src: Path, out: Path, force: bool) -> None:
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the input model: write the quantized model elsewhere")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"{out} exists: choose a new --out directory, or pass --force to replace it"
        )


def state_bytes(model) -> int:
    """Bytes of the tensors save_model writes (what model.safetensors holds, less its header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main(args, extra) -> None:
    from zerolm.files import atomic_dir
    from zerolm.model import load_model, save_model
    from zerolm.tokenizer import Tokenizer
    from zerolm.transforms.calibrate import calibration_ids
    from zerolm.transforms.quantize import check_quantizable, quantize_model

    src, out = Path(model_dir(args)), Path(args.out)
    cfg = resolve_config(args, extra)
    q = cfg.quant
    _check_out(src, out, args.force)
    model = load_model(src)
    check_quantizable(model, q)  # before drawing calibration text
    tok = Tokenizer.load(src) if (src / "tokenizer.json").is_file() else None
    calib = None
    if q.method in ("gptq", "awq"):
        if tok is None:
            raise ValueError(f"--method {q.method} reads calibration text: {src} has no tokenizer")
        calib = calibration_ids(tok, cfg.calib, model.cfg.max_seq_len)
    before = state_bytes(model)
    start = time.perf_counter()
    quantize_model(model, q, calib)
    seconds = time.perf_counter() - start
    after = state_bytes(model)
    with atomic_dir(out) as tmp:
        save_model(model, tmp, tok)
    layers = model.zerolm_quant["layers"]
    head = {"auto": "int8", "float": "float"}.get(q.head, q.head)
    scheme = "sym" if q.method == "int8" else q.scheme
    print(
        f"quantized {len(layers)} layers to {q.method} (group {q.group or 'row'}, {scheme}; "
        f"head {head}): {before:,} -> {after:,} bytes ({before / after:.2f}x smaller) in "
        f"{seconds:.1f} s; wrote {out}"
    )


def setup_arg_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model's weights to int8 / int4 (llama.cpp's Q8_0 / Q4_0 / Q4_1 codes)",
        description="quantize every linear layer, the embedding and the output head of a decoder "
        "model directory and write the quantized model directory, which generate, chat, serve, "
        "eval-poems, inspect and export load as it is. Every option is a [quant] or [calib] "
        "config key (--quant.group=64 == --group 64).",
    )
    model_arg(p, "float model directory")
    add_recipe_args(p)
    methods = ["int8", "int4", "gptq", "awq"]
    alias(p, "--method", key="quant.method", choices=methods, help="gptq/awq: calibrated int4")
    alias(p, "--group", key="quant.group", type=int, help="weights per scale (0: one per row)")
    alias(p, "--scheme", key="quant.scheme", choices=["sym", "asym"], help="int4 only")
    alias(
        p,
        "--head",
        key="quant.head",
        choices=["auto", "int8", "int4", "float"],
        help="the output head (and a tied embedding); auto: int8",
    )
    alias(p, "--calib-data", key="calib.data", action="append", help="calibration text file")
    alias(p, "--calib-corpus", key="calib.corpus", action="append", help="bundled corpus")
    alias(p, "--calib-seqs", key="calib.seqs", type=int, help="calibration sequences")
    alias(p, "--calib-seq-len", key="calib.seq_len", type=int, help="tokens per sequence")
    alias(p, "--calib-seed", key="calib.seed", type=int, help="seed of the draw")
    p.add_argument("--out", required=True, help="output model directory, written whole")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=main)
