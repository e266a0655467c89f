"""Encoder (bert) commands: classify with a fine-tuned classifier, embed sentences."""

from __future__ import annotations

import json
import sys


def cmd_classify(args, extra) -> None:
    from zerolm.finetune.classify_predict import classify_file

    r = classify_file(
        args.model,
        args.input,
        text_field=args.text_field,
        pair_field=args.pair_field,
        label_field=args.label_field,
        truncation=args.truncation,
        batch_size=args.batch_size,
    )
    for label, p in zip(r["predictions"], r["probs"]):
        print(
            json.dumps({"label": label, "prob": round(p, 4)}, ensure_ascii=False)
            if args.json
            else label
        )
    if "val_acc" in r:
        print(
            f"accuracy {r['val_acc']:.1%} on {r['rows']} labelled rows "
            f"(macro-F1 {r['val_macro_f1']:.3f})",
            file=sys.stderr,
        )


def cmd_embed(args, extra) -> None:
    from zerolm.infer.embed import embed_file

    embed_file(
        args.model,
        args.input,
        args.output,
        field=args.field,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        progress=not args.quiet,
    )


def _setup_classify(sub) -> None:
    cl = sub.add_parser(
        "classify",
        help="label texts with a fine-tuned classifier (accuracy if rows have labels)",
        description="print the predicted label of every row of a JSONL file (or .txt: one text "
        "per line); with a label in every row, also the accuracy (stderr)",
    )
    cl.add_argument("model", help="classifier directory (finetune-classify's OUT/model)")
    cl.add_argument(
        "--input", required=True, help="JSONL rows with --text-field (and --label-field), or .txt"
    )
    cl.add_argument("--text-field", default="text")
    cl.add_argument(
        "--pair-field", default="", help="a second text per row (sentence-pair classifiers)"
    )
    cl.add_argument("--label-field", default="label")
    cl.add_argument(
        "--truncation",
        choices=["longest_first", "error"],
        default="longest_first",
        help="a row longer than the window: cut the longer text from its end (with a warning), "
        "or fail",
    )
    cl.add_argument("--batch-size", type=int, default=64)
    cl.add_argument(
        "--json", action="store_true", help="one JSON object per row: label and its probability"
    )
    cl.set_defaults(run=cmd_classify)


def _setup_embed(sub) -> None:
    em = sub.add_parser(
        "embed",
        help="sentence embeddings from a bert model (mean-pooled, L2-normalised)",
        description="embed texts with a bert model (e.g. an imported all-MiniLM-L6-v2): the mean "
        "of the final hidden states over each text's tokens, L2-normalised, so dot products are "
        "cosine similarities. Texts longer than the window (or --max-tokens) are truncated with "
        "a warning.",
    )
    em.add_argument("model", help="bert model directory")
    em.add_argument(
        "--input",
        required=True,
        help="a .txt file (one text per line) or .jsonl (field --field); blank lines are skipped",
    )
    em.add_argument(
        "--output",
        help="OUT.jsonl (rows {text, embedding}) or OUT.npy ((N, D) float32, input order); "
        "default: JSONL on stdout",
    )
    em.add_argument("--field", default="text", help="the text field of .jsonl rows")
    em.add_argument("--batch-size", type=int, default=32)
    em.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="truncate texts to this many tokens with [CLS] and [SEP] (default: the model "
        "window; sentence-transformers uses 256 for all-MiniLM-L6-v2)",
    )
    em.add_argument("--quiet", action="store_true", help="no progress bar")
    em.set_defaults(run=cmd_embed)


def setup_arg_parser(sub) -> None:
    _setup_classify(sub)
    _setup_embed(sub)
