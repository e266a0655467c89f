"""`zerolm tokenizer train | encode | decode`."""

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


def setup_arg_parser(sub) -> None:
    tk = sub.add_parser("tokenizer", help="train, encode, decode").add_subparsers(
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
