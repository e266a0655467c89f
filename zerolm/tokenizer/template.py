"""A foreign model's own Jinja chat template, rendered as transformers' `apply_chat_template`
renders it: the same sandboxed environment (ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, loop controls, `{% generation %}` blocks), globals (raise_exception,
strftime_now, namespace, dict) and `tojson` filter, and the same variables (messages,
add_generation_prompt, bos_token, eos_token, pad_token, unk_token, tools, documents).

The rendered text is encoded with add_special_tokens=False, as apply_chat_template(tokenize=True)
does. The loss mask (1 on the tokens of assistant turns) comes from the template's
`{% generation %}` blocks where it has them, otherwise from rendering each prefix of the
conversation and checking that every assistant turn is a prefix-stable token range.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from zerolm.tokenizer.tokenizer import Tokenizer

_SPANS: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
    "zerolm_generation_spans", default=None
)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body, and records the body's
    character span while a render is being tracked (TRL / transformers' assistant masks)."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads the class attribute)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller) -> str:
        text = caller()
        if (state := _SPANS.get()) is not None:
            blocks, spans = state
            start = sum(map(len, blocks))
            spans.append((start, start + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore attributes (no way to CPython internals)."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a template may not set {name!r} on a namespace")


class _Dict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=_Dict(),
        namespace=_Namespace,
    )
    return env


class ChatTemplate:
    """A chat template string bound to the tokenizer it renders for. `name` says where it came
    from, for errors."""

    def __init__(self, source: str, tok: Tokenizer, name: str):
        self.source, self.tok, self.name = source, tok, name
        try:
            self.compiled = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"the chat template of {name} is not valid Jinja: {e}") from None
        self.has_generation = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None

    def variables(self, messages: Sequence[dict], add_generation_prompt: bool) -> dict[str, Any]:
        names = self.tok.special_tokens(turn_end=False)
        return dict(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **{f"{role}_token": names.get(role, "") for role in ("bos", "eos", "pad", "unk")},
        )

    def text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The rendered conversation; ValueError naming the template if it refuses it."""
        try:
            return self.compiled.render(**self.variables(messages, add_generation_prompt))
        except jinja2.exceptions.TemplateError as e:
            roles = ", ".join(m.get("role", "?") for m in messages)
            raise ValueError(
                f"the chat template of {self.name} cannot render this conversation (roles: "
                f"{roles}): {e}; change the conversation to what the template accepts"
            ) from None

    def _spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        token = _SPANS.set((blocks, spans))
        try:
            for block in self.compiled.generate(**self.variables(messages, False)):
                blocks.append(block)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(
                f"the chat template of {self.name} cannot render this conversation: {e}"
            ) from None
        finally:
            _SPANS.reset(token)
        return "".join(blocks), spans

    def ids(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.tok.encode(self.text(messages, add_generation_prompt))

    def render(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int], list[int]]:
        """(ids, loss_mask, ends) as zerolm's own renderer returns them (tokenizer/chat.py): the
        mask is 1 on each assistant turn's tokens, ends the length after each message."""
        ids = self.ids(messages, add_generation_prompt)
        ends = self._ends(messages, ids)
        if self.has_generation:
            mask = self._generation_mask(messages, ids)
        else:
            mask = self._prefix_mask(messages, ids, ends)
        if add_generation_prompt:
            mask += [0] * (len(ids) - len(mask))
        return ids, mask[: len(ids)], ends

    def _ends(self, messages: Sequence[dict], ids: list[int]) -> list[int]:
        """Length of the rendering after each message, where that rendering is a token prefix of
        the whole (-1 where it is not: a template that rewrites earlier turns later)."""
        out = []
        for i in range(1, len(messages) + 1):
            part = self.ids(messages[:i]) if i < len(messages) else ids
            out.append(len(part) if ids[: len(part)] == part else -1)
        return out

    def _generation_mask(self, messages: Sequence[dict], ids: list[int]) -> list[int]:
        text, spans = self._spans(messages)
        enc = self.tok.hf.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        for start, end in spans:
            for t, (a, b) in enumerate(enc.offsets):
                if a < end and b > start and b > a:
                    mask[t] = 1
        return mask

    def _prefix_mask(self, messages: Sequence[dict], ids: list[int], ends: list[int]) -> list[int]:
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.ids(messages[:i], add_generation_prompt=True))
            prompt = self.ids(messages[:i], add_generation_prompt=True)
            if ends[i] < 0 or ids[:start] != prompt:
                raise ValueError(
                    f"cannot find assistant turn {i} in the chat template of {self.name}: its "
                    "rendering is not a token prefix of the whole conversation and the template "
                    "has no {% generation %} blocks; add them around the assistant content"
                )
            end = ends[i]
            stops = set(self.tok.stop_ids)
            last = max((t for t in range(start, end) if ids[t] in stops), default=end - 1)
            mask[start : last + 1] = [1] * (last + 1 - start)
        return mask

    @cached_property
    def turn_end(self) -> int | None:
        """The special token that closes an assistant turn (<|im_end|>, <|eot_id|>, </s>...): the
        first special token after the reply in a rendered one-turn conversation."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            ids = self.ids(probe)
            start = len(self.ids(probe[:1], add_generation_prompt=True))
        except ValueError:
            return None
        special = self.tok.special_ids
        return next((i for i in ids[start:] if i in special), None)
