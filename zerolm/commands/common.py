"""What the command modules share: recipe flags, short-flag aliases, and resolving the config tree.

One option grammar: every setting is a config key (`--sample.temperature=0`); a familiar short flag
(`--temperature 0`) is an alias that writes the same key. Precedence: config defaults < the
command's defaults < TOML (--config) < short flags (aliases, positional inputs) < dotted overrides.
"""

from __future__ import annotations

import argparse

from zerolm.config import Config, load_config, merge_dicts, parse_overrides

KEY = "key:"  # argparse dest prefix of an alias; the rest of the dest is its dotted config key


class SetKeys(argparse.Action):
    """A flag that sets several config keys (--resume-changed: train.resume and resume_changed)."""

    def __init__(self, option_strings, dest, keys: dict, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)
        self.keys = keys

    def __call__(self, parser, namespace, values, option_string=None):
        for key, value in self.keys.items():
            setattr(namespace, KEY + key, value)


def alias(p: argparse.ArgumentParser, *flags: str, key: str, help: str = "", **kw) -> None:
    """A short flag for config key `key`; left out, it leaves the key to the TOML and defaults."""
    if kw.get("action", "store") in ("store", "append") and "choices" not in kw:
        kw.setdefault("metavar", key.rsplit(".", 1)[-1].upper())
    text = f"{help} (config key {key})" if help else f"config key {key}"
    p.add_argument(*flags, dest=KEY + key, default=argparse.SUPPRESS, help=text, **kw)


def flag(p: argparse.ArgumentParser, name: str, key: str, help: str = "") -> None:
    """An on/off alias: `--compile` sets `sample.compile = true`."""
    alias(p, name, key=key, action="store_const", const=True, help=help)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """--config: a TOML path or a bundled recipe's name; dotted overrides follow it."""
    p.add_argument(
        "--config",
        help="TOML recipe: a path, or a bundled recipe by name (e.g. speedrun, tang, bert-tang)",
    )


def stage_parser(sub, name: str, run, help: str, inputs: bool = True) -> argparse.ArgumentParser:
    """A command that runs a pipeline stage: --config, --out, --quiet and (optionally) the
    inputs."""
    p = sub.add_parser(name, help=help, description=help)
    add_recipe_args(p)
    alias(p, "--out", key="out_dir", help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if inputs:
        p.add_argument(
            KEY + "data.inputs",
            nargs="*",
            default=argparse.SUPPRESS,
            metavar="inputs",
            help=".txt/.jsonl/.parquet files or directories (config key data.inputs)",
        )
        alias(p, "--corpus", key="data.corpus", help="bundled corpus name(s), comma-separated")
    p.set_defaults(run=run)
    return p


def resume_changed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume-changed",
        action=SetKeys,
        keys={"train.resume": True, "train.resume_changed": True},
        help="resume from the newest checkpoint even if the data, tokenizer, model or training "
        "settings changed since (recorded in the checkpoint and log; config key "
        "train.resume_changed)",
    )


def sampling_args(p: argparse.ArgumentParser) -> None:
    """The familiar sampling flags, each an alias of a [sample] key (`zerolm config` lists them)."""
    alias(p, "--max-new-tokens", key="sample.max_new_tokens", type=int)
    alias(p, "--temperature", key="sample.temperature", type=float, help="0: greedy")
    alias(p, "--top-k", key="sample.top_k", type=int)
    alias(p, "--top-p", key="sample.top_p", type=float)
    alias(p, "--min-p", key="sample.min_p", type=float)
    alias(p, "--repetition-penalty", key="sample.repetition_penalty", type=float)
    alias(p, "--presence-penalty", key="sample.presence_penalty", type=float)
    alias(p, "--frequency-penalty", key="sample.frequency_penalty", type=float)
    alias(p, "--seed", key="sample.seed", type=int, help="fix the sampling randomness")


def compile_arg(p: argparse.ArgumentParser) -> None:
    flag(
        p,
        "--compile",
        "sample.compile",
        "decode with an ahead-of-time compiled step: ~2x the tokens/s, after 20-60 s compiling "
        "the first time",
    )


def tp_arg(p: argparse.ArgumentParser) -> None:
    """--tp N: tensor-parallel decoding over the N processes of `torchrun --nproc-per-node N`."""
    p.add_argument(
        "--tp",
        type=int,
        metavar="N",
        help="tensor parallelism: split every block over N processes; run under `torchrun "
        "--nproc-per-node N -m zerolm ...` (float models, no --compile)",
    )


def _nest(key: str, value) -> dict:
    *parents, leaf = key.split(".")
    node = {leaf: value}
    for p in reversed(parents):
        node = {p: node}
    return node


def resolve_config(args: argparse.Namespace, extra: list[str], **defaults) -> Config:
    """The config a command runs with: `defaults` are the command's own (below the TOML)."""
    short: dict = {}
    for dest, value in vars(args).items():
        if dest.startswith(KEY):
            short = merge_dicts(short, _nest(dest[len(KEY) :], value))
    overrides = merge_dicts(short, parse_overrides(extra))
    return load_config(getattr(args, "config", None), overrides, base=defaults)


def model_arg(p: argparse.ArgumentParser, help: str = "model directory") -> None:
    """The model directory, as a positional or as --model (the spelling `generate` takes)."""
    p.add_argument("model", nargs="?", help=help)
    p.add_argument("--model", dest="model_flag", metavar="DIR", help=f"{help} (or positional)")


def model_dir(args: argparse.Namespace) -> str:
    """The directory model_arg read; ValueError if neither or two different ones were given."""
    given = {m for m in (args.model, args.model_flag) if m}
    if len(given) != 1:
        raise ValueError("give one model directory: `--model DIR` (or DIR as the first argument)")
    return given.pop()
