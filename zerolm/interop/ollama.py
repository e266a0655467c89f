"""An Ollama Modelfile for an exported GGUF: `FROM ./model.gguf`, a TEMPLATE in Ollama's Go
text/template syntax that renders the prompt the tokenizer's chat template renders, the stop
tokens, and the template's default system prompt.

Jinja cannot be translated to Go templates in general, so the TEMPLATE is derived by probing: the
chat template renders conversations with marker contents, and the text around the markers gives,
per role, the prefix and suffix of a message, the text before the first message, the default
system turn inserted when there is no system message, and the generation prompt. The decomposition
is then checked against the chat template on several conversations (contents with edge whitespace,
newlines, CJK); a template it does not reproduce exactly (one that trims or moves content, renders
turns differently by position, folds the system prompt into a user turn) is a ValueError.

Ollama's data (template/template.go): .Messages with .Role and .Content, the generation prompt is
the template's own job (rendered when the last message is not the assistant's), and a Modelfile
SYSTEM is prepended as a system message when a conversation has none (server/routes.go).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jinja2

from zerolm.interop.gguf_tokenizer import llama_cpp_adds
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import CHAT_TEMPLATE
from zerolm.tokenizer.template import ChatTemplate

DOCS = "https://github.com/ollama/ollama/blob/main/docs/template.md"
ROLES = ("system", "user", "assistant")
Render = Callable[[Sequence[dict], bool], str]

# what the decomposition is checked on: edge whitespace and newlines catch `| trim`, a reply's
# <think> catches templates that cut reasoning out; every role first, in the middle and last
_TEXTS = [
    " Hi there,\n  friend. ",
    "写一首诗",
    "\nSure:\n\n1. one\n2. two\n",
    "<think>\nA plan.\n</think>\n\nok",  # a reply with its reasoning, as Ollama sends it back
    "\tWhy? ",
]
_SHAPES = ["u", "su", "ua", "uau", "sua", "suauau", "uaua"]


@dataclass(frozen=True)
class Parts:
    """A chat format as Ollama's TEMPLATE renders it: `bos` once; `head` before a first message
    that is not a system message (a default system turn); prefix + content + suffix per message;
    `close` after a final assistant message, `generation` after any other final message."""

    bos: str
    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    close: str
    generation: str
    system: str | None  # the default system prompt `head` holds, if it is a system turn

    def render(self, messages: Sequence[dict]) -> str:
        """The text the TEMPLATE renders for `messages` (the Go template's logic, in Python)."""
        out = [self.bos]
        for i, m in enumerate(messages):
            if i == 0 and m["role"] != "system":
                out.append(self.head)
            out += [self.prefix[m["role"]], m["content"], self.suffix[m["role"]]]
        if messages:
            out.append(self.close if messages[-1]["role"] == "assistant" else self.generation)
        return "".join(out)

    def go(self) -> str:
        """The Go text/template, in Ollama's own layout (range with $last, if/else if by role).
        A trim marker `{{-` only ever follows an action: it eats the layout newline, never text."""
        lines = [
            "{{- range $i, $_ := .Messages }}",
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        ]
        if self.bos:
            lines.append(_when("eq $i 0", self.bos, trim=True))
        if self.head:
            lines.append(_when('and (eq $i 0) (ne .Role "system")', self.head, trim=True))
        body = []
        for role in ROLES:
            keyword = "{{- if" if role == "system" else "{{ else if"
            body.append(f'{keyword} eq .Role "{role}" }}}}{_lit(self.prefix[role])}')
            body.append("{{ .Content }}" + _lit(self.suffix[role]))
            if role == "assistant" and self.close:
                body.append(_when("$last", self.close))
        lines.append("".join(body) + "{{ end }}")
        if self.generation:
            lines.append(_when('and $last (ne .Role "assistant")', self.generation, trim=True))
        lines.append("{{- end }}")
        return "\n".join(lines)


def _when(condition: str, text: str, trim: bool = False) -> str:
    """{{ if condition }}text{{ end }}; trim: `{{- if` (on a line of its own, after an action)."""
    return f"{{{{{'-' if trim else ''} if {condition} }}}}{_lit(text)}{{{{ end }}}}"


def _lit(text: str) -> str:
    """`text` as template text: as it is where Ollama's Modelfile parser and Go keep it exactly
    (printable, no action opener, no triple quote), else as a Go string literal action."""
    plain = all(c.isprintable() or c in "\n\t" for c in text)
    if plain and "{{" not in text and '"""' not in text:
        return text
    return "{{ " + _go_string(text) + " }}"


def _go_string(text: str) -> str:
    """A Go interpreted string literal for `text` (printable characters kept, others escaped)."""
    named = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for c in text:
        if c in named:
            out.append(named[c])
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


# ---------------------------------------------------------------- the Modelfile
def modelfile(tok: Tokenizer, gguf_name: str) -> str:
    """The Modelfile of `gguf_name` (a file in the Modelfile's folder) with `tok`'s chat format;
    ValueError (why, and the docs to write it by hand) for a chat template Ollama's TEMPLATE
    cannot reproduce, a stop token a Modelfile cannot hold, or a name that is not a file name."""
    if not gguf_name or "/" in gguf_name or "\\" in gguf_name or not gguf_name.isprintable():
        raise ValueError(f"{gguf_name!r} is not a file name: give the GGUF's name, like model.gguf")
    parts = template_parts(tok)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{parts.go()}"""']
    if parts.system and _modelfile_safe(parts.system):
        lines.append(f'SYSTEM """{parts.system}"""')
    for i in tok.stop_ids:
        stop = tok.token_str(i)
        if not stop.isprintable() or '"' in stop:
            raise ValueError(
                f"the stop token {stop!r} cannot be written in a Modelfile (a quote or an "
                "unprintable character); give the model a plain end-of-turn token"
            )
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def _modelfile_safe(text: str) -> bool:
    """Ollama's parser keeps it exactly inside \"\"\"...\"\"\" (it drops unprintable runes)."""
    return '"""' not in text and all(c.isprintable() or c in "\n\t" for c in text)


def chat_renderer(tok: Tokenizer) -> tuple[Render, ChatTemplate]:
    """(render(messages, add_generation_prompt) -> text, the ChatTemplate it renders): the
    tokenizer's own chat template, or zerolm's CHAT_TEMPLATE (bos_token <|bos|>)."""
    if tok.template is not None:
        return tok.template.text, tok.template
    if tok.layout != "zerolm":
        raise ValueError(
            "this tokenizer has no chat template, so no Ollama TEMPLATE can be written: add a "
            "chat_template.jinja to the model directory, or export with --format gguf"
        )
    zerolm = ChatTemplate(CHAT_TEMPLATE, tok, "zerolm's chat format")

    def render(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        variables = zerolm.variables(messages, add_generation_prompt)
        return zerolm.compiled.render(**variables, bos_token=tok.special_tokens()["bos"])

    return render, zerolm


def added_prefix(tok: Tokenizer) -> str:
    """The special token llama.cpp and Ollama put before every prompt of the exported GGUF (its
    bos, when it has add_bos_token): the TEMPLATE must not write it again."""
    bos, add_bos, _ = llama_cpp_adds(tok)
    return tok.token_str(bos) if add_bos and bos is not None else ""


def template_parts(tok: Tokenizer) -> Parts:
    """The tokenizer's chat format as Parts, checked against the chat template itself."""
    jinja, chat = chat_renderer(tok)
    name = chat.name
    prefix = added_prefix(tok)

    def render(messages: Sequence[dict], generation: bool) -> str:
        text = jinja(messages, generation)
        return text[len(prefix) :] if prefix and text.startswith(prefix) else text

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"the chat template of {name} cannot be written as an Ollama TEMPLATE: {why}; write "
            f"the TEMPLATE by hand: {DOCS}"
        )

    if re.search(r"\bstrftime_now\b", chat.source):
        raise refuse("it writes today's date (strftime_now), which a TEMPLATE would freeze")
    specials = [t.content for t in tok.hf.get_added_tokens_decoder().values()]
    zerolm_bos = tok.special_tokens()["bos"] if tok.layout == "zerolm" else None
    bos = tok.token_names.get("bos_token", zerolm_bos)
    try:
        parts = _probe(render, specials, bos if "bos_token" in chat.source else None)
        for shape in _SHAPES:
            messages = _conversation(shape, _TEXTS)
            if parts.render(messages) != render(messages, messages[-1]["role"] != "assistant"):
                roles = ", ".join(m["role"] for m in messages)
                raise _Mismatch(
                    f"the conversation ({roles}) is not the sum of its messages' parts (the "
                    "template trims, moves or rewrites content, or writes a turn by its position)"
                )
    except _Mismatch as e:
        raise refuse(str(e)) from None
    except (ValueError, jinja2.TemplateError) as e:
        raise refuse(f"it fails on a plain conversation ({' '.join(str(e).split())})") from None
    return parts


class _Mismatch(Exception):
    """The rendering does not decompose into per-message parts (the reason)."""


def _conversation(shape: str, texts: Sequence[str]) -> list[dict]:
    """Messages of roles `shape` ("sua": system, user, assistant) with contents from `texts`."""
    role = {"s": "system", "u": "user", "a": "assistant"}
    return [{"role": role[r], "content": texts[i % len(texts)]} for i, r in enumerate(shape)]


def _probe(render: Render, specials: Sequence[str], bos: str | None) -> Parts:
    """Parts from renderings with marker contents: the text between two markers is the first
    message's suffix + the next one's prefix, split where two such texts part (at a special
    token's start, not inside one); the generation prompt only for a final non-assistant turn."""
    marks = [f"@@{i}@@" for i in range(3)]

    def pieces(shape: str, generation: bool) -> list[str]:
        return _split(render(_conversation(shape, marks), generation), marks[: len(shape)])

    head_u, after_u = pieces("u", True)  # after_u: suffix[user] + generation
    _, alone_u = pieces("u", False)  # suffix[user] (+ what a template ends with)
    _, u_to_a, after_a = pieces("ua", False)  # suffix[user] + prefix[assistant]; suffix + close
    _, _, a_to_u, _ = pieces("uau", True)  # suffix[assistant] + prefix[user]
    head_s, s_to_u, _ = pieces("su", True)  # bos + prefix[system]; suffix[system] + prefix[user]
    # the template's own markup tokens (<|end|>, [INST]) need not be in the vocabulary
    seen = re.findall(r"<[^<>\s]+>|\[/?[A-Z_]+\]", after_u + alone_u + after_a + a_to_u)
    specials = [*specials, *seen]
    suffix_u = _snap(_common(after_u, alone_u, u_to_a), specials)
    suffix_a = _snap(_common(after_a, a_to_u), specials)
    prefix_u = a_to_u[len(suffix_a) :]
    if not (head_u.endswith(prefix_u) and s_to_u.endswith(prefix_u)):
        raise _Mismatch("a user turn is written differently after an assistant turn than first")
    suffix_s = s_to_u[: len(s_to_u) - len(prefix_u)]
    before = head_u[: len(head_u) - len(prefix_u)]  # bos + any default system turn
    bos_text, head, system = _head(before, head_s, suffix_s, bos)
    return Parts(
        bos=bos_text,
        head=head,
        prefix={
            "system": head_s[len(bos_text) :],
            "user": prefix_u,
            "assistant": u_to_a[len(suffix_u) :],
        },
        suffix={"system": suffix_s, "user": suffix_u, "assistant": suffix_a},
        close=after_a[len(suffix_a) :],
        generation=after_u[len(suffix_u) :],
        system=system,
    )


def _head(before: str, head_s: str, suffix_s: str, bos: str | None):
    """(bos, head, default system prompt): `before` is what precedes a first user message,
    head_s what precedes a first system message's content."""
    if head_s.startswith(before):
        return before, "", None
    n = len(head_s) + len(suffix_s)
    if before.startswith(head_s) and before.endswith(suffix_s) and len(before) >= n:
        bos = bos if bos and head_s.startswith(bos) else ""
        return bos, before[len(bos) :], before[len(head_s) : len(before) - len(suffix_s)]
    return "", before, None


def _split(text: str, marks: Sequence[str]) -> list[str]:
    """The texts around each marker, in order; each must appear exactly once."""
    out = []
    for mark in marks:
        if text.count(mark) != 1:
            raise _Mismatch(f"a message's content appears {text.count(mark)} times, not once")
        before, text = text.split(mark)
        out.append(before)
    return [*out, text]


def _common(*texts: str) -> str:
    """The longest common prefix."""
    n = 0
    while all(len(t) > n for t in texts) and len({t[n] for t in texts}) == 1:
        n += 1
    return texts[0][:n]


def _snap(text: str, specials: Sequence[str]) -> str:
    """`text` cut back until it does not end inside a special token's string."""
    while True:
        cut = next(
            (
                p
                for t in specials
                for p in range(max(0, len(text) - len(t) + 1), len(text))
                if t.startswith(text[p:])
            ),
            None,
        )
        if cut is None:
            return text
        text = text[:cut]
