"""Building a Config from TOML recipes, a command's defaults and dotted CLI overrides."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from zerolm.config.schema import Config
from zerolm.config.validate import validate


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(key: str, where: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(
        f"unknown config key '{where}{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}"
    )


def _coerce(value: Any, tp: Any, name: str) -> Any:  # noqa: C901 (one branch per field type)
    """Convert a TOML value or CLI string to `tp`, or raise ValueError naming `name`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return tuple(
            _coerce(v.strip("'\"") if isinstance(v, str) else v, item, name) for v in value
        )
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value in ("none", "None"):
            return None
        return _coerce(value, args[0], name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}")
        if isinstance(value, str):
            try:
                return tp(float(value)) if tp is int and value.lower().count("e") else tp(value)
            except ValueError:
                raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name}: expected int, got {value!r}")
        if isinstance(value, (int, float)):
            return tp(value)
        raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} for {name}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(key, prefix, list(fields))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(
                    f"{prefix}{key}: is a section; set its keys, e.g. --{prefix}{key}.<key>=..."
                )
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def merge_dicts(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def parse_overrides(args: list[str]) -> dict:
    """['--data.val_fraction=0.1', '--seed', '3'] ->
    {'data': {'val_fraction': '0.1'}, 'seed': '3'}."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ValueError(
                f"unexpected argument {arg!r}: overrides look like --section.key=value"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"override --{key} needs a value: --{key}=VALUE")
            value = args[i + 1]
            i += 1
        node = out
        *parents, leaf = key.replace("-", "_").split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--{key}: '{p}' is set both as a value and as a section")
        node[leaf] = value
        i += 1
    return out


RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # package data, found by name


def recipe_path(name_or_path: str | Path) -> Path:
    """A TOML file by path, or a bundled recipe by name (`speedrun` ->
    zerolm/recipes/speedrun.toml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if len(path.parts) == 1 and bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.toml")))
    raise ValueError(
        f"config file {str(path)!r} does not exist; give a TOML path or a bundled recipe: {names}"
    )


def load_config(
    toml_path: str | Path | None = None, overrides: dict | None = None, base: dict | None = None
) -> Config:
    """Resolve defaults < base (a command's own defaults) < TOML file < overrides (nested dicts,
    e.g. from parse_overrides)."""
    values: dict = {}
    if toml_path:
        path = recipe_path(toml_path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None
    values = merge_dicts(merge_dicts(base or {}, values), overrides or {})
    cfg = _build(Config, values)
    validate(cfg)
    return cfg
