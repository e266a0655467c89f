"""The `zerolm` command: one subcommand per stage, each a thin call into its package.

Every subcommand that runs a stage takes `--config recipe.toml` and dotted overrides such as
`--data.val_fraction=0.1` (precedence: CLI > TOML > defaults); `zerolm config` prints them all.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from zerolm.config import Config, load_config, parse_overrides, to_toml

log = logging.getLogger("zerolm")


def _config(args, extra: list[str], **defaults) -> Config:
    """Config defaults < this command's defaults < TOML (--config) < shorthand flags (--out,
    --corpus, positional inputs) < dotted overrides (--data.min_chars=10)."""
    short: dict = {}
    if getattr(args, "out", None):
        short["out_dir"] = args.out
    if getattr(args, "inputs", None):
        short.setdefault("data", {})["inputs"] = list(args.inputs)
    if getattr(args, "corpus", None):
        short.setdefault("data", {})["corpus"] = args.corpus
    overrides = parse_overrides(extra)
    for key, value in short.items():
        overrides[key] = {**value, **overrides.get(key, {})} if isinstance(value, dict) else overrides.get(key, value)
    return load_config(args.config, overrides, base=defaults)


def _print_summary(summary: dict) -> None:
    docs = summary["docs"]
    log.info("documents: read %d, kept %d (train %d, val %d); dropped %s", docs["documents_read"],
             docs["documents_kept"], docs["splits"]["train"]["documents"], docs["splits"]["val"]["documents"],
             docs["dropped"] or "none")
    if tok := summary.get("tokenizer"):
        log.info("tokenizer: %s, vocab %d, trained in %ss", tok["kind"], tok["vocab_size"], tok["train_seconds"])
        for lang, s in tok["compression_val"].items():
            log.info("  held-out %-5s %6.2f bytes/token %5.2f chars/token (%d docs)", lang,
                     s["bytes_per_token"], s["chars_per_token"], s["documents"])
    if sh := summary.get("shards"):
        for split, s in sh["splits"].items():
            log.info("shards %-5s %d tokens (%s) in %d file(s)", split, s["tokens"], sh["dtype"], len(s["files"]))
    log.info("written to %s", summary["out_dir"])


def cmd_prepare(args, extra, stages=("docs", "tokenizer", "shards"), **defaults):
    from zerolm.data.prepare import prepare

    cfg = _config(args, extra, **defaults)
    summary = prepare(cfg, stages=stages, progress=not args.quiet)
    _print_summary(summary)
    return summary


def cmd_speedrun(args, extra):
    summary = cmd_prepare(args, extra, out_dir="runs/speedrun", data={"corpus": ["tang"]})
    out = summary["out_dir"]
    print(f"\nspeedrun: data and tokenizer ready in {out}/ (shards in {out}/shards, tokenizer in {out}/tokenizer).")
    print("next: pretraining, chat fine-tuning and serving join this pipeline as they land; "
          f"try `zerolm tokenizer encode --tokenizer {out}/tokenizer '床前明月光'` meanwhile.")


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
        raise ValueError("decode takes integer token ids, e.g. `zerolm tokenizer decode --tokenizer DIR 17 42`") from None
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise ValueError(f"token id(s) {bad[:5]} out of range: this tokenizer has ids 0..{tok.vocab_size - 1}")
    sys.stdout.write(tok.decode(ids) + "\n")


def cmd_config(args, extra):
    print(to_toml(_config(args, extra)), end="")


def cmd_corpora(args, extra):
    from zerolm.data.sources import CORPORA

    for name, desc in CORPORA.items():
        print(f"{name:12s} {desc}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerolm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name, fn, help, inputs=True, parent=sub):
        sp = parent.add_parser(name, help=help, description=help)
        sp.add_argument("--config", help="TOML recipe (see recipes/)")
        sp.add_argument("--out", help="output directory (config key out_dir)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        if inputs:
            sp.add_argument("inputs", nargs="*", help=".txt/.jsonl/.parquet files or directories")
            sp.add_argument("--corpus", help="bundled corpus name(s), comma-separated: tang, shakespeare")
        sp.set_defaults(fn=fn)
        return sp

    stage("prepare", cmd_prepare, "clean, de-duplicate and split text, train a tokenizer, write token shards")
    stage("speedrun", cmd_speedrun, "the whole pipeline on the bundled Tang-poem corpus (or --corpus/inputs)")
    stage("config", cmd_config, "print the resolved config as TOML")

    tk = sub.add_parser("tokenizer", help="train, encode, decode").add_subparsers(dest="tcmd", required=True,
                                                                                  metavar="ACTION")
    stage("train", cmd_tok_train, "train a tokenizer (bpe, wordpiece or char) on text", parent=tk)
    for name, fn, help in (("encode", cmd_tok_encode, "text (argument or stdin) -> token ids"),
                           ("decode", cmd_tok_decode, "token ids (arguments or stdin) -> text")):
        sp = tk.add_parser(name, help=help, description=help)
        sp.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory holding one")
        if name == "encode":
            sp.add_argument("text", nargs="?", help="text to encode (default: read stdin)")
            sp.add_argument("--tokens", action="store_true", help="print token strings instead of ids")
        else:
            sp.add_argument("ids", nargs="*", help="token ids (default: read stdin)")
        sp.set_defaults(fn=fn)
    sub.add_parser("corpora", help="list the bundled corpora").set_defaults(fn=cmd_corpora)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "config")
    if extra and not takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.fn(args, extra)
    except ValueError as e:
        print(f"zerolm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zerolm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
