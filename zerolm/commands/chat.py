"""`zerolm chat`: an interactive REPL (or one --prompt) with a chat model."""

from __future__ import annotations

from zerolm.commands.common import (
    add_recipe_args,
    compile_arg,
    model_arg,
    model_dir,
    resolve_config,
    sampling_args,
)


def main(args, extra) -> None:
    from zerolm.infer.chat import repl
    from zerolm.infer.text import sampling_params
    from zerolm.model import load_model
    from zerolm.tokenizer import Tokenizer
    from zerolm.transforms.layout import decode_layout

    path = model_dir(args)
    sample = resolve_config(args, extra, sample={"temperature": 0.7, "max_new_tokens": 96}).sample
    model = decode_layout(load_model(path))
    repl(
        model,
        Tokenizer.load(path),
        sampling_params(sample),
        max_new_tokens=sample.max_new_tokens,
        system=args.system,
        seed=sample.seed,
        prompt=args.prompt,
        name=path,
        compile=sample.compile,
        show_prompt=args.show_prompt,
    )


def setup_arg_parser(sub) -> None:
    c = sub.add_parser(
        "chat",
        help="talk to a chat model (interactive, streaming)",
        description="talk to a chat model: an interactive REPL with streaming replies and the "
        "conversation kept within the model window. Type /help in it for its commands. "
        "Sampling: the [sample] config keys (defaults here: temperature 0.7, 96 tokens).",
    )
    model_arg(c, "model directory (e.g. runs/speedrun/sft/model)")
    c.add_argument("--prompt", help="one message: print the reply and exit")
    c.add_argument("--system", default="", help="system message")
    c.add_argument(
        "--show-prompt",
        action="store_true",
        help="print each prompt the chat template renders (what the model reads, its special "
        "tokens by name) to stderr, as a JSON string",
    )
    add_recipe_args(c)
    sampling_args(c)
    compile_arg(c)
    c.set_defaults(run=main)
