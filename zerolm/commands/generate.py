"""`zerolm generate`: continue prompts with a trained model ([sample] section, short flags)."""

from __future__ import annotations

import sys

from zerolm.commands.common import (
    add_recipe_args,
    alias,
    compile_arg,
    resolve_config,
    sampling_args,
    tp_arg,
)


def main(args, extra) -> None:
    from zerolm.dist import group
    from zerolm.dist.tensor import check_launch
    from zerolm.infer.text import TextGenerator

    cfg = resolve_config(args, extra)
    check_launch(args.tp, cfg.sample.compile)  # before loading anything
    gen = TextGenerator(args.model, cfg.sample, tp=args.tp or 1)
    # every rank decodes rank 0's prompts: only rank 0 reads stdin (one process: as they are)
    prompts = group.broadcast(args.prompts or ([sys.stdin.read()] if group.is_main() else []))
    if args.stream and len(prompts) == 1:
        sys.stdout.write(prompts[0])
        for piece in gen.stream(prompts[0]):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for text in gen.generate(prompts):
        print(text)
        if len(prompts) > 1:
            print("---")


def setup_arg_parser(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="continue prompts with a trained model",
        description="continue prompts with a trained model (zerolm model directory); every "
        "option is a [sample] config key (--sample.temperature=0 == --temperature 0)",
    )
    g.add_argument("--model", required=True, help="model directory (e.g. runs/speedrun/model)")
    g.add_argument(
        "prompts",
        nargs="*",
        help="prompt text(s); several are generated as one batch (default: stdin)",
    )
    add_recipe_args(g)
    sampling_args(g)
    alias(g, "--stop", key="sample.stop", action="append", help="stop string (repeatable)")
    alias(
        g,
        "--context",
        key="sample.context",
        choices=["truncate", "error"],
        help="a prompt longer than the model window: keep its end (with a warning) or fail",
    )
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    compile_arg(g)
    tp_arg(g)
    g.set_defaults(run=main)
