"""A foreign model's own Jinja chat template, rendered as transformers' `apply_chat_template`
renders it: the same sandboxed environment (ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, loop controls, `{% generation %}` blocks), globals (raise_exception,
strftime_now, namespace, dict) and `tojson` filter, and the same variables (messages,
add_generation_prompt, the named special tokens its files give, tools, documents).

The rendered text is encoded as `apply_chat_template(..., sanitize_control_tokens=True)` encodes
it (tokenizer/sanitize.py): a control token typed into a message stays text. The loss mask (1 on
the tokens of assistant turns) comes from the template's `{% generation %}` blocks where it has
them, otherwise from rendering each prefix of the conversation and checking that every assistant
turn is a prefix-stable token range; where neither works it is a ValueError naming the template.
"""

from __future__ import annotations

import copy
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

from zerolm.tokenizer import sanitize

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
    from, for errors; `control` lists the tokenizer's "chat_control_tokens" if it sets them."""

    def __init__(
        self, source: str, tok: Tokenizer, name: str, control: Sequence[str] | None = None
    ):
        self.source, self.tok, self.name = source, tok, name
        env = _environment()
        try:
            self.compiled = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"the chat template of {name} is not valid Jinja: {e}") from None
        self.has_generation = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None
        tokens = sanitize.control_tokens(tok.hf, env, source, control)
        self._control_re = sanitize.patterns(tokens)[0]

    def variables(self, messages: Sequence[dict], add_generation_prompt: bool) -> dict[str, Any]:
        """What transformers passes: the tokenizer's named special tokens (bos_token, eos_token,
        ... as its files name them), tools and documents (None), the messages without None values
        and with reasoning aliased ("reasoning_content" <-> "thinking")."""
        return dict(
            self.tok.token_names,
            messages=_messages(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )

    def _generate(self, messages: Sequence[dict], add_generation_prompt: bool, spans: list | None):
        """The rendered text, from messages with their control tokens marked if `spans` is not
        None (recording the {% generation %} spans into it); ValueError naming the template if it
        refuses the conversation."""
        if spans is not None:
            messages = sanitize.mark(list(messages), self._control_re)
        blocks: list[str] = []
        token = _SPANS.set(None if spans is None else (blocks, spans))
        try:
            for block in self.compiled.generate(**self.variables(messages, add_generation_prompt)):
                blocks.append(block)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError) as e:
            roles = ", ".join(str(m.get("role", "?")) for m in messages)
            why = " ".join(str(e).split())
            raise ValueError(
                f"the chat template of {self.name} cannot render this conversation (roles: "
                f"{roles}): {why}; change the conversation to what the template accepts"
            ) from None
        finally:
            _SPANS.reset(token)
        return "".join(blocks)

    def text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The rendered conversation, as apply_chat_template(tokenize=False) gives it."""
        return self._generate(messages, add_generation_prompt, None)

    def _encode(self, messages, add_generation_prompt: bool):
        """(ids, offsets, generation spans) of the sanitized rendering (tokenizer/sanitize.py)."""
        spans: list[tuple[int, int]] = []
        chat = self._generate(messages, add_generation_prompt, spans)
        ids, offsets = sanitize.encode_marked(self.tok.hf, chat)
        return ids, offsets, spans

    def ids(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """The conversation's ids: apply_chat_template(..., sanitize_control_tokens=True)."""
        return self._encode(messages, add_generation_prompt)[0]

    def render(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int], list[int]]:
        """(ids, loss_mask, ends) as zerolm's own renderer returns them (tokenizer/chat.py): the
        mask is 1 on each assistant turn's tokens, ends the length after each message.

        With {% generation %} blocks the mask is transformers' return_assistant_tokens_mask: every
        token overlapping a block, as the template author drew it. Without them each assistant
        turn is found by rendering prefixes: from the end of the generation prompt up to and
        including the turn's first stop token (its end of turn or eos: the model learns to stop),
        not what the template writes after it (ChatML's "\n")."""
        ids, offsets, spans = self._encode(messages, add_generation_prompt)
        n = len(messages)
        parts = [self.ids(messages[:i]) for i in range(1, n)]
        parts.append(self.ids(messages) if add_generation_prompt else ids)
        ends = [len(p) if ids[: len(p)] == p else -1 for p in parts]
        if self.has_generation:
            return ids, _span_mask(offsets, spans), ends
        return ids, self._prefix_mask(messages, ids, parts), ends

    def _prefix_mask(self, messages: Sequence[dict], ids: list[int], parts: list) -> list[int]:
        """Assistant turn i spans from the end of the generation prompt after messages[:i] to
        its first stop token in the rendering of messages[:i+1] (else that rendering's end); both
        must be token prefixes of the whole (what a template appends after a turn's stop token
        only at the very end, like Phi-3's eos, does not matter)."""
        mask, stops = [0] * len(ids), set(self.tok.stop_ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.ids(messages[:i], add_generation_prompt=True) if i else []
            part, start = parts[i], len(prompt)
            last = next((t for t in range(start, len(part)) if part[t] in stops), len(part) - 1)
            if last < start or ids[:start] != prompt or ids[: last + 1] != part[: last + 1]:
                raise ValueError(
                    f"cannot find assistant turn {i} in the chat template of {self.name}: its "
                    "rendering is not a token prefix of the whole conversation and the template "
                    "has no {% generation %} blocks; add them around the assistant content"
                )
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


_REASONING = ("reasoning_content", "thinking", "reasoning")  # transformers' names, standard first


def _messages(messages: Sequence[dict]) -> list[dict]:
    """Fresh copies as transformers hands them to a template: None values dropped (OpenAI's
    content=None), a message's reasoning under "reasoning_content" and "thinking" both."""
    out = []
    for m in messages:
        m = copy.deepcopy({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 on every token overlapping a {% generation %} span (transformers' single pass)."""
    mask, k = [0] * len(offsets), 0
    for t, (a, b) in enumerate(offsets):
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if b > spans[k][0]:
            mask[t] = 1
    return mask
