"""`zerolm translate`: an encdec model's translations, with BLEU/chrF given references."""

from __future__ import annotations

import json

from zerolm.commands.common import add_recipe_args, alias, resolve_config, sampling_args


def main(args, extra) -> None:
    from zerolm.eval.translate_lines import translate_lines

    cfg = resolve_config(args, extra, sample={"temperature": 0.0, "max_new_tokens": 0})
    out = translate_lines(
        args.model,
        cfg.translate,
        cfg.sample,
        texts=args.texts,
        input=args.input,
        reference=args.reference,
        progress=not args.quiet,
    )
    if args.output:
        from zerolm.files import atomic_write_text

        atomic_write_text(args.output, "".join(h + "\n" for h in out.hypotheses))
    elif out.scores is None or args.show:
        print("\n".join(out.hypotheses))
    if out.scores is not None:
        print(json.dumps(out.scores))


def setup_arg_parser(sub) -> None:
    tr = sub.add_parser(
        "translate",
        help="translate with an encoder-decoder model (BLEU/chrF with --reference)",
        description="translate texts with an encdec model: beam search by default, greedy with "
        "--beam 1, sampling with --temperature > 0 ([translate] and [sample] config keys).",
    )
    tr.add_argument("model", help="encdec model directory (e.g. runs/bible/model)")
    tr.add_argument(
        "texts", nargs="*", help="texts to translate (default: --input, or lines on stdin)"
    )
    tr.add_argument("--input", help="a text file, one source per line")
    tr.add_argument(
        "--reference",
        help="line-aligned reference translations: print BLEU and chrF (with the "
        "copy-the-source baseline) as JSON",
    )
    tr.add_argument(
        "--output", help="write the translations here (one per line) instead of printing them"
    )
    tr.add_argument(
        "--show", action="store_true", help="with --reference: print the translations too"
    )
    alias(tr, "--beam", key="translate.beam", type=int, help="beam width (1: greedy)")
    alias(
        tr,
        "--length-penalty",
        key="translate.length_penalty",
        type=float,
        help="beam scores are log-prob / length**this",
    )
    alias(tr, "--batch-size", key="translate.batch_size", type=int)
    alias(
        tr,
        "--truncate",
        key="translate.too_long",
        action="store_const",
        const="truncate",
        help="cut sources longer than the encoder window (default: an error)",
    )
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    add_recipe_args(tr)
    sampling_args(tr)
    tr.set_defaults(run=main)
