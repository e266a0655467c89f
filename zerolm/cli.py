"""The `zerolm` command: a table of command modules (zerolm/commands/), each owning its parser.

Every setting is a config key: `--config` takes a TOML recipe (a path, or a bundled one by name:
`--config speedrun`), dotted overrides set single keys (`--data.val_fraction=0.1`,
`--sample.temperature=0`), and the familiar short flags are aliases (`--temperature 0`).
Precedence: CLI > TOML > defaults; `zerolm config` prints every section.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys

from zerolm.config import Config

# command modules, in the order `zerolm --help` lists their commands
COMMANDS = (
    "data",  # prepare, config, corpora
    "train",  # speedrun, pretrain, sft, reward, dpo, ppo, finetune-classify
    "generate",
    "chat",
    "serve",
    "eval",  # eval-poems
    "translate",
    "encoders",  # classify, embed
    "interop",  # import
    "export",
    "quantize",
    "prune",
    "inspect",
    "tokenizer",  # tokenizer train | encode | decode | extend
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zerolm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"zerolm.commands.{name}").setup_arg_parser(sub)
    return p


def _join_overrides(argv: list[str]) -> list[str]:
    """['--out_dir', 'x'] -> ['--out_dir=x'] for config keys, so argparse cannot take 'x' for a
    positional input file."""
    top = {f.name for f in dataclasses.fields(Config)}
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        key = a[2:].replace("-", "_")
        if (
            a.startswith("--")
            and "=" not in a
            and key.split(".")[0] in top
            and i + 1 < len(argv)
            and not argv[i + 1].startswith("--")
        ):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _disk_full(e: OSError) -> bool:
    from zerolm.files import disk_full

    if not disk_full(e):
        return False
    print(
        f"zerolm: error: the disk is full{f' (writing {e.filename})' if e.filename else ''}: "
        "free space and run the command again (every output is written atomically: nothing "
        "partial was kept)",
        file=sys.stderr,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file at INFO
    parser = build_parser()
    args, extra = parser.parse_known_args(
        _join_overrides(sys.argv[1:] if argv is None else list(argv))
    )
    if extra and not hasattr(args, "config"):  # only commands with a config take dotted keys
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args, extra)
    except ValueError as e:
        print(f"zerolm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not _disk_full(e):
            raise
        return 2
    except KeyboardInterrupt:
        print("zerolm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
