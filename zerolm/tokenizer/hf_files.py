"""A foreign (HF) tokenizer directory's special tokens by role and its chat template.

transformers spreads these over several files, and a later file overrides an earlier one the way
`AutoTokenizer` and `GenerationConfig` read them:

- tokenizer_config.json: bos/eos/pad/unk tokens (strings or AddedToken objects), chat_template
  (a string, or a list of {name, template}), add_bos_token / add_eos_token;
- special_tokens_map.json: the same token keys, for older checkpoints;
- chat_template.jinja (transformers >= 4.43 saves the template there), chat_template.json;
- generation_config.json, then config.json: bos/eos/pad ids (eos may be a list: every id ends a
  reply, e.g. Llama 3's <|end_of_text|> and <|eot_id|>).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)  # what a foreign tokenizer is made of: copied unchanged into every model directory made from it


@dataclass(frozen=True)
class Roles:
    """Special token ids by role. eos: every id that ends a document or reply, the document end
    first. (The chat template's end-of-turn token is found by rendering: tokenizer/template.py.)"""

    bos: int | None
    eos: tuple[int, ...]
    pad: int | None
    unk: int | None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore it from the checkpoint") from None
    return out if isinstance(out, dict) else {}


def _content(token) -> str | None:
    """A token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


NAMED = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # transformers' named special tokens


def read_names(directory: Path) -> dict[str, str]:
    """{"bos_token": "<s>", ...}: the named special tokens as transformers' AutoTokenizer reads
    them (and passes to a chat template). special_tokens_map.json is read only by a config
    without "added_tokens_decoder" (older checkpoints), and then its entries win."""
    config = _read_json(directory / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:
        config = {**config, **_read_json(directory / "special_tokens_map.json")}
    names = {f"{r}_token": _content(config.get(f"{r}_token")) for r in NAMED}
    return {k: v for k, v in names.items() if v is not None}


def read_control_tokens(directory: Path) -> list[str] | None:
    """tokenizer_config.json's "chat_control_tokens" (see tokenizer/sanitize.py), if it sets it."""
    listed = _read_json(directory / "tokenizer_config.json").get("chat_control_tokens")
    return [t for t in listed if isinstance(t, str)] if isinstance(listed, list) else None


def read_roles(hf: _HFTokenizer, directory: Path) -> Roles:
    """The roles of a foreign tokenizer in `directory`: by name from its tokenizer files, else by
    id from generation_config.json, else config.json. ValueError if it has no eos token."""
    names = read_names(directory)
    gen = {
        **_read_json(directory / "config.json"),
        **_read_json(directory / "generation_config.json"),
    }

    def by_name(role: str) -> int | None:
        token = names.get(f"{role}_token")
        if token is None:
            return None
        if (i := hf.token_to_id(token)) is None:
            raise ValueError(
                f"the {role}_token {token!r} of the tokenizer in {directory} is not in its "
                "vocabulary: fix tokenizer_config.json (or special_tokens_map.json)"
            )
        return i

    def by_id(role: str) -> list[int]:
        return [i for i in _ids(gen.get(f"{role}_token_id")) if hf.id_to_token(i) is not None]

    eos = list(dict.fromkeys([i for i in [by_name("eos")] if i is not None] + by_id("eos")))
    if not eos:
        raise ValueError(
            f'the tokenizer in {directory} has no eos token: set "eos_token" in its '
            'tokenizer_config.json (or "eos_token_id" in generation_config.json)'
        )
    bos, pad = by_name("bos"), by_name("pad")
    return Roles(
        bos=bos if bos is not None else next(iter(by_id("bos")), None),
        eos=tuple(eos),
        pad=pad if pad is not None else next(iter(by_id("pad")), None),
        unk=by_name("unk"),
    )


def read_template(directory: Path) -> str | None:
    """The directory's default chat template, or None if it has none."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template")
    if template is None:
        template = _read_json(directory / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def read_files(directory: Path) -> dict[str, bytes]:
    """The tokenizer files present in `directory`, as bytes (saved back unchanged)."""
    return {n: (directory / n).read_bytes() for n in FILES if (directory / n).is_file()}
