"""`zerolm eval-poems`: the share of held-out poem requests answered in the requested form."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from zerolm.commands.common import add_recipe_args, resolve_config, sampling_args


def cmd_eval_poems(args, extra):
    from zerolm.data.prepare import read_docs
    from zerolm.infer.text import sampling_params
    from zerolm.tasks.poems.instruct import compare_models
    from zerolm.tasks.poems.requests import eval_requests

    sample = resolve_config(args, extra, sample={"temperature": 0.0, "max_new_tokens": 96}).sample
    docs = Path(args.docs) / "val.jsonl"
    if not docs.is_file():
        raise ValueError(
            f"{docs} not found: --docs takes a prepared run's docs/ directory "
            "(e.g. runs/speedrun/docs)"
        )
    requests = eval_requests(read_docs(docs), seed=sample.seed or 0, limit=args.limit)
    out = compare_models(
        args.models,
        requests,
        reference=args.reference,
        shards=args.shards,
        max_new_tokens=sample.max_new_tokens,
        sampling=sampling_params(sample),
        seed=sample.seed,
        say=lambda line: print(line, file=sys.stderr),
    )
    print(json.dumps(out, ensure_ascii=False))
    return out


def setup_arg_parser(sub) -> None:
    ev = sub.add_parser(
        "eval-poems", help="share of held-out poem requests answered in the requested form"
    )
    ev.add_argument(
        "models", nargs="+", help="model directories to compare (e.g. the base and the SFT model)"
    )
    ev.add_argument(
        "--docs",
        default="runs/speedrun/docs",
        help="prepared docs/ whose val.jsonl holds the requests",
    )
    ev.add_argument("--limit", type=int, default=200, help="number of held-out requests")
    ev.add_argument(
        "--reference",
        help="also measure each model's KL to this model (e.g. the SFT model): replies "
        "sampled at temperature 1 on the same requests",
    )
    ev.add_argument(
        "--shards",
        help="also measure validation bits per byte on these token shards (e.g. "
        "runs/speedrun/shards)",
    )
    add_recipe_args(ev)
    sampling_args(ev)
    ev.set_defaults(run=cmd_eval_poems)
