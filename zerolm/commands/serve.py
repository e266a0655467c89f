"""`zerolm serve`: the OpenAI-compatible API and web UI; every option is a [serve] config key."""

from __future__ import annotations

import os
import sys

from zerolm.commands.common import (
    add_recipe_args,
    alias,
    flag,
    model_arg,
    model_dir,
    resolve_config,
    tp_arg,
)

LOCAL = ("127.0.0.1", "localhost", "::1")


def main(args, extra) -> None:
    from zerolm.dist.tensor import check_launch
    from zerolm.serve.app import serve

    cfg = resolve_config(args, extra)
    s = cfg.serve
    check_launch(args.tp, s.compile)  # under torchrun: --tp WORLD_SIZE, before loading anything
    api_key = s.api_key or os.environ.get("ZEROLM_API_KEY") or None
    if s.host not in LOCAL and not api_key:
        print(
            f"zerolm serve: warning: listening on {s.host} without --api-key: anyone who can "
            "reach it may use it",
            file=sys.stderr,
        )
    model = leader = None
    if (args.tp or 1) > 1:  # every rank its shard; rank 0 serves, the others follow it
        from zerolm.dist import group
        from zerolm.serve.tp import Leader, follow, load_sharded

        model = load_sharded(model_dir(args), args.tp, cfg.dist)
        if not group.is_main():
            me = f"rank {group.rank()} of {args.tp} (pid {os.getpid()})"
            print(f"zerolm serve: {me} follows rank 0", file=sys.stderr, flush=True)
            return follow(model, s.max_batch)
        leader = Leader(model, s.max_batch, heartbeat=min(60.0, cfg.dist.timeout / 4))
    try:
        serve(
            model_dir(args),
            host=s.host,
            port=s.port,
            api_key=api_key,
            max_batch=s.max_batch,
            max_queue=s.max_queue,
            limits=_limits(s),
            log_level=s.log_level,
            name=s.name or None,
            compile=s.compile,
            model=model,
            mirror=leader,
        )
    finally:
        if leader is not None:  # however the server ended: the followers exit too
            leader.close()


def _limits(s):
    from zerolm.serve.limits import Limits

    return Limits(
        max_tokens=s.max_tokens,
        max_n=s.max_n,
        max_messages=s.max_messages,
        max_prompt_tokens=s.max_prompt_tokens,
        max_body_bytes=s.max_body_bytes,
        max_inspect=s.max_inspect,
        header_timeout_s=s.header_timeout,
        body_timeout_s=s.body_timeout,
        keep_alive_s=s.keep_alive,
        shutdown_timeout_s=s.shutdown_timeout,
        max_connections=s.max_connections,
    )


# the short flags: (flag, type, help); each is --serve.<flag without dashes, '-' as '_'>
_FLAGS = (
    ("--host", str, "address to bind (default: this machine only)"),
    ("--port", int, ""),
    ("--name", str, "model id in the API (default: the directory's name, or its parent's)"),
    ("--api-key", str, "require 'Authorization: Bearer KEY' on /v1 (or set ZEROLM_API_KEY)"),
    ("--max-batch", int, "sequences decoded together (KV-cache slots)"),
    ("--max-queue", int, "waiting sequences before 503 + Retry-After"),
    ("--max-tokens", int, "limit (and default) for max_tokens per choice"),
    ("--max-n", int, "limit for n (choices per request)"),
    ("--max-messages", int, "limit for messages per chat request"),
    ("--max-prompt-tokens", int, "limit for prompt tokens (default: window-1)"),
    ("--max-body-bytes", int, "limit for a request body (413 above)"),
    ("--max-inspect", int, "inspector calls at once (503 above)"),
    ("--max-connections", int, "open sockets at most, lowered to fit the fd limit"),
    ("--header-timeout", float, "seconds for a request head to arrive whole"),
    ("--body-timeout", float, "seconds for a request body to arrive (408)"),
    ("--keep-alive", int, "seconds an idle keep-alive connection stays open"),
    ("--shutdown-timeout", int, "on SIGTERM/Ctrl-C, seconds before running requests are cancelled"),
)


def setup_arg_parser(sub) -> None:
    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible API + web chat UI (continuous batching)",
        description="serve a model: the OpenAI API at /v1 (chat/completions, completions, models), "
        "a web chat UI with an inspector at /, /health and /metrics.",
    )
    model_arg(sv, "model directory (e.g. runs/speedrun/sft/model, or an imported one)")
    add_recipe_args(sv)
    for name, tp, help in _FLAGS:
        alias(sv, name, key="serve." + name[2:].replace("-", "_"), type=tp, help=help)
    alias(
        sv,
        "--log-level",
        key="serve.log_level",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn's log level (info logs every request)",
    )
    flag(
        sv,
        "--compile",
        "serve.compile",
        "decode through an ahead-of-time compiled step of all --max-batch slots (empty ones "
        "masked): faster with many clients, slower with one; 20-60 s compiling the first time",
    )
    tp_arg(sv)
    sv.set_defaults(run=main)
