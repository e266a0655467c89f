"""`zerolm tokenizer train | encode | decode | extend`."""

from __future__ import annotations

import json
import sys

from zerolm.commands.common import stage_parser
from zerolm.commands.data import cmd_prepare


def cmd_tok_train(args, extra):
    cmd_prepare(args, extra, stages=("docs", "tokenizer"))


def _read_text(args) -> str:
    return args.text if args.text is not None else sys.stdin.read()


def cmd_tok_encode(args, extra):
    from zerolm.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(_read_text(args))
    if args.tokens:
        print(json.dumps([tok.hf.id_to_token(i) for i in ids], ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))


def cmd_tok_decode(args, extra):
    from zerolm.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    raw = args.ids if args.ids else sys.stdin.read().replace(",", " ").split()
    try:
        ids = [int(x) for x in raw]
    except ValueError:
        raise ValueError(
            "decode takes integer token ids, e.g. `zerolm tokenizer decode --tokenizer DIR 17 42`"
        ) from None
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise ValueError(
            f"token id(s) {bad[:5]} out of range: this tokenizer has ids 0..{tok.vocab_size - 1}"
        )
    sys.stdout.write(tok.decode(ids) + "\n")


def _read_tokens(path: str) -> list[str]:
    """One token per line (the line break is not part of it; blank lines are skipped)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--add {path}: cannot read it as UTF-8 text ({e})") from None
    tokens = [t for t in lines if t.strip()]
    if not tokens:
        raise ValueError(f"--add {path} is empty: give one token per line")
    return tokens


def _print_report(rows: dict) -> None:
    print(f"{'held-out':<9} {'docs':>6} {'bytes':>10} {'tokens':>19} {'bytes/token':>15}")
    for lang, r in rows.items():
        tokens = f"{r['tokens_before']:,} -> {r['tokens_after']:,}"
        bpt = f"{r['bytes_per_token_before']:.3f} -> {r['bytes_per_token_after']:.3f}"
        print(f"{lang:<9} {r['documents']:>6,} {r['bytes']:>10,} {tokens:>19} {bpt:>15}")


def cmd_tok_extend(args, extra):
    import time

    from zerolm.tokenizer import Tokenizer
    from zerolm.tokenizer.extend import check_extendable, choose_tokens, compare, han_counts
    from zerolm.transforms.resize import extend_model, split_corpus

    start = time.perf_counter()
    base = Tokenizer.load(args.model)
    check_extendable(base)
    out = args.out or f"{args.model.rstrip('/')}-extended"
    if args.add:
        tokens, held = _read_tokens(args.add), None
    else:
        train, held = split_corpus(args.from_corpus)
        tokens = choose_tokens(base, *han_counts(train), args.count)
    ext = extend_model(args.model, out, tokens)
    held = split_corpus("tang")[1] if held is None else held  # --add: the bundled Tang poems
    rows = compare(base, ext.tokenizer, held + split_corpus("shakespeare")[1])
    print(
        f"added {len(ext.added):,} tokens (+{len(ext.intermediate):,} byte-pair tokens they are "
        f"built from): vocabulary {base.vocab_size:,} -> {ext.tokenizer.vocab_size:,}; wrote {out}"
    )
    _print_report(rows)
    report = {
        "out": out,
        "added": len(ext.added),
        "intermediate": len(ext.intermediate),
        "vocab_size_before": base.vocab_size,
        "vocab_size_after": ext.tokenizer.vocab_size,
        "held_out": rows,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(report, ensure_ascii=False))


def setup_arg_parser(sub) -> None:
    tk = sub.add_parser("tokenizer", help="train, encode, decode, extend").add_subparsers(
        dest="tcmd", required=True, metavar="ACTION"
    )
    stage_parser(tk, "train", cmd_tok_train, "train a tokenizer (bpe, wordpiece or char) on text")
    for name, run, help in (
        ("encode", cmd_tok_encode, "text (argument or stdin) -> token ids"),
        ("decode", cmd_tok_decode, "token ids (arguments or stdin) -> text"),
    ):
        sp = tk.add_parser(name, help=help, description=help)
        sp.add_argument(
            "--tokenizer", required=True, help="tokenizer.json or a directory holding one"
        )
        if name == "encode":
            sp.add_argument("text", nargs="?", help="text to encode (default: read stdin)")
            sp.add_argument(
                "--tokens", action="store_true", help="print token strings instead of ids"
            )
        else:
            sp.add_argument("ids", nargs="*", help="token ids (default: read stdin)")
        sp.set_defaults(run=run)
    help = "add tokens to a model's byte-level BPE tokenizer, resizing its embedding and head"
    sp = tk.add_parser("extend", help=help, description=help)
    sp.add_argument("--model", required=True, help="a zerolm model directory (e.g. imported)")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--add", metavar="FILE", help="tokens to add, one per line")
    src.add_argument(
        "--from-corpus",
        metavar="PATH",
        help="count Han characters and words in this file/directory or bundled corpus (tang)",
    )
    sp.add_argument("--count", type=int, default=1000, help="tokens to take from the corpus")
    sp.add_argument("--out", help="the extended model directory (default: MODEL-extended)")
    sp.set_defaults(run=cmd_tok_extend)
