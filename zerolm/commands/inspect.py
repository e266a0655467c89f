"""`zerolm inspect`: parameters by component, FLOPs per token, memory ([inspect] section), and
the tokenizer's special tokens and chat template."""

from __future__ import annotations

import json
from pathlib import Path

from zerolm.commands.common import add_recipe_args, alias, model_arg, model_dir, resolve_config


def tokenizer_line(tok) -> str:
    """The tokenizer a model directory holds: kind, size, special tokens by role, chat template."""
    roles = ", ".join(f"{k} {v}" for k, v in tok.special_tokens().items()) or "no special roles"
    own = "the model's own" if tok.template is not None else "none"
    template = "zerolm's" if tok.layout == "zerolm" else own
    return (
        f"tokenizer: {tok.layout} {tok.kind}, {tok.vocab_size:,} tokens; {roles}; "
        f"chat template: {template}"
    )


def main(args, extra) -> None:
    from zerolm.inspect.accounting import account, format_account
    from zerolm.model import load_model
    from zerolm.tokenizer import Tokenizer

    path = model_dir(args)
    ins = resolve_config(args, extra).inspect
    model = load_model(path)
    a = account(model, context=ins.context or None, batch=ins.batch)
    tok = Tokenizer.load(path) if (Path(path) / "tokenizer.json").is_file() else None
    if args.json:
        if tok is not None:
            a["special_tokens"] = tok.special_tokens()
            a["chat_template"] = tok.template is not None or tok.layout == "zerolm"
        print(json.dumps(a, ensure_ascii=False))
        return
    print(format_account(a, model.cfg))
    if tok is not None:
        print(tokenizer_line(tok))


def setup_arg_parser(sub) -> None:
    p = sub.add_parser("inspect", help="parameters by component, FLOPs per token, memory")
    model_arg(p)
    add_recipe_args(p)
    alias(p, "--context", key="inspect.context", type=int, help="context length (0: the model's)")
    alias(p, "--batch", key="inspect.batch", type=int, help="batch size for the KV-cache figure")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=main)
