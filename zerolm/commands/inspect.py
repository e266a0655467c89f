"""`zerolm inspect`: parameters by component, FLOPs per token, memory ([inspect] section)."""

from __future__ import annotations

import json

from zerolm.commands.common import add_recipe_args, alias, resolve_config


def main(args, extra) -> None:
    from zerolm.inspect.accounting import account, format_account
    from zerolm.model import load_model

    ins = resolve_config(args, extra).inspect
    model = load_model(args.model)
    a = account(model, context=ins.context or None, batch=ins.batch)
    print(json.dumps(a) if args.json else format_account(a, model.cfg))


def setup_arg_parser(sub) -> None:
    p = sub.add_parser("inspect", help="parameters by component, FLOPs per token, memory")
    p.add_argument("model", help="model directory")
    add_recipe_args(p)
    alias(p, "--context", key="inspect.context", type=int, help="context length (0: the model's)")
    alias(p, "--batch", key="inspect.batch", type=int, help="batch size for the KV-cache figure")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=main)
