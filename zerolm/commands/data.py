"""Data commands: prepare (clean, split, tokenizer, shards), config (print the tree), corpora."""

from __future__ import annotations

import logging

from zerolm.commands.common import resolve_config, stage_parser
from zerolm.config import to_toml

log = logging.getLogger("zerolm")


def _print_summary(summary: dict) -> None:
    docs = summary["docs"]
    log.info(
        "documents: read %d, kept %d (train %d, val %d); dropped %s",
        docs["documents_read"],
        docs["documents_kept"],
        docs["splits"]["train"]["documents"],
        docs["splits"]["val"]["documents"],
        docs["dropped"] or "none",
    )
    if tok := summary.get("tokenizer"):
        log.info(
            "tokenizer: %s, vocab %d, trained in %ss",
            tok["kind"],
            tok["vocab_size"],
            tok["train_seconds"],
        )
        for lang, s in tok["compression_val"].items():
            log.info(
                "  held-out %-5s %6.2f bytes/token %5.2f chars/token (%d docs)",
                lang,
                s["bytes_per_token"],
                s["chars_per_token"],
                s["documents"],
            )
    if sh := summary.get("shards"):
        for split, s in sh["splits"].items():
            log.info(
                "shards %-5s %d tokens (%s) in %d file(s)",
                split,
                s["tokens"],
                sh["dtype"],
                len(s["files"]),
            )
    log.info("written to %s", summary["out_dir"])


def cmd_prepare(args, extra, stages=("docs", "tokenizer", "shards"), **defaults):
    from zerolm.data.prepare import prepare

    cfg = resolve_config(args, extra, **defaults)
    summary = prepare(cfg, stages=stages, progress=not args.quiet)
    _print_summary(summary)
    return summary


def cmd_config(args, extra) -> None:
    print(to_toml(resolve_config(args, extra)), end="")


def cmd_corpora(args, extra) -> None:
    from zerolm.data.sources import CORPORA

    for name, desc in CORPORA.items():
        print(f"{name:12s} {desc}")


def setup_arg_parser(sub) -> None:
    stage_parser(
        sub,
        "prepare",
        cmd_prepare,
        "clean, de-duplicate and split text, train a tokenizer, write token shards",
    )
    stage_parser(
        sub,
        "config",
        cmd_config,
        "print the resolved config as TOML: every section, the stages' and the commands' "
        "(sample, serve, inspect, translate)",
    )
    sub.add_parser("corpora", help="list the bundled corpora").set_defaults(run=cmd_corpora)
