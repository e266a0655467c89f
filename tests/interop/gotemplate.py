"""A small interpreter of Go's text/template (https://pkg.go.dev/text/template), for the tests of
zerolm/interop/ollama.py: Ollama renders a Modelfile's TEMPLATE with Go's package, and neither Go
nor Ollama is installed here. It implements the subset Ollama's chat templates use, as the spec
defines it; anything else is a GoTemplateError, never skipped.

- text and {{actions}}; "{{- " trims all white space (space, tab, CR, LF) before it, " -}}" after
- comments {{/* ... */}}
- pipelines: commands joined by |, the previous result passed as the last argument; ( ) groups;
  arguments: . (dot), .Field chains, $ and $var (with .Field chains), (pipeline).Field,
  "interpreted" and `raw` strings, integers, true, false
- variables: {{ $x := pipeline }} declares (scope: to the end of the enclosing control
  structure), {{ $x = pipeline }} assigns; $ is the data passed to render
- {{if}} {{else if}} {{else}} {{end}}; {{range pipeline}}, {{range $v := ...}},
  {{range $i, $v := ...}} over lists (dot = the element), with {{else}} for an empty one
- functions: eq (arg1 equal to any of the others), ne, and, or (short-circuit, returning an
  argument as Go does), not, len, slice, index
- truth: false, 0, nil (None), and empty strings, lists and maps are false
- fields: dict keys; a missing key is an error (Ollama's messages are Go structs)
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["GoTemplateError", "render"]


class GoTemplateError(ValueError):
    """Syntax this interpreter does not implement, or an error Go's would raise executing."""


_SPACE = " \t\r\n"
_TOKEN = re.compile(
    r"""(?P<ws>[ \t\r\n]+)|(?P<str>"(?:\\.|[^"\\\n])*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)
    |(?P<op>:=|[=(),|])|(?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+)|(?P<dot>\.)
    |(?P<word>[A-Za-z_]\w*)""",
    re.VERBOSE,
)
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_ESCAPES.update({"\\": "\\", '"': '"'})


# ---------------------------------------------------------------- lexing
def _lex(source: str) -> list[tuple[str, Any]]:
    """[("text", str) | ("action", [tokens])], trim markers applied to the texts."""
    items: list[tuple[str, Any]] = []
    pos, trim_next = 0, False
    while True:
        start = source.find("{{", pos)
        text = source[pos:] if start < 0 else source[pos:start]
        if trim_next:
            text = text.lstrip(_SPACE)
        if start < 0:
            items.append(("text", text))
            return items
        i = start + 2
        if source.startswith("-", i) and source[i + 1 : i + 2] in tuple(_SPACE):
            text, i = text.rstrip(_SPACE), i + 1  # "{{- ": trim the text before
        items.append(("text", text))
        tokens, pos, trim_next = _action(source, i)
        if tokens is not None:
            items.append(("action", tokens))


def _action(source: str, i: int) -> tuple[list[tuple[str, str, int]] | None, int, bool]:
    """(tokens or None for a comment, position after "}}", whether it ends with " -}}")."""
    body = source[i:].lstrip(_SPACE)
    if body.startswith("/*"):
        end = source.find("*/", i)
        m = re.compile(r"\*/([ \t\r\n]+-)?}}").match(source, end) if end >= 0 else None
        if m is None:
            raise GoTemplateError("unclosed comment (a comment must end with */}})")
        return None, m.end(), m.group(1) is not None
    tokens = []
    while True:
        if source.startswith("}}", i):
            return tokens, i + 2, False
        m = re.compile(r"[ \t\r\n]+-}}").match(source, i)
        if m is not None:
            return tokens, m.end(), True
        m = _TOKEN.match(source, i)
        if m is None:
            where = source[i : i + 20]
            raise GoTemplateError(f"unexpected {where!r} in an action" if where else "no }}")
        if m.lastgroup != "ws":
            tokens.append((m.lastgroup, m.group(), i))
        i = m.end()


# ---------------------------------------------------------------- parsing
def _parse(items: list[tuple[str, Any]]):
    """The node list of the whole template (text, action, if, range nodes)."""
    nodes, stop = _parse_list(items, 0, ())
    if stop[0] is not None:
        raise GoTemplateError(f"unexpected {{{{{stop[0]}}}}}")
    return nodes


def _parse_list(items, k: int, ends: tuple[str, ...]):
    """Nodes from items[k] up to an action starting with one of `ends` ("end", "else"):
    (nodes, (keyword or None, its tokens, index after it))."""
    nodes: list[tuple] = []
    while k < len(items):
        kind, value = items[k]
        k += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value[0][1] if value and value[0][0] == "word" else None
        if word in ("end", "else"):
            if word not in ends:
                raise GoTemplateError(f"unexpected {{{{{word}}}}}")
            return nodes, (word, value[1:], k)
        if word == "if":
            node, k = _parse_if(items, k, value[1:])
        elif word == "range":
            node, k = _parse_range(items, k, value[1:])
        elif word in ("with", "define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"{{{{{word}}}}} is not implemented by this interpreter")
        else:
            node = ("action", _pipeline(value))
        nodes.append(node)
    if ends:
        raise GoTemplateError("missing {{end}}")
    return nodes, (None, [], k)


def _parse_if(items, k: int, tokens):
    branches, other = [], []
    while True:
        body, (word, rest, k) = _parse_list(items, k, ("end", "else"))
        branches.append((_condition(tokens, "if"), body))
        if word == "end":
            _no_args(rest, "end")
            return ("if", branches, other), k
        if rest and rest[0][1] == "if":  # {{else if pipeline}}
            tokens = rest[1:]
            continue
        _no_args(rest, "else")
        other, (word, rest, k) = _parse_list(items, k, ("end",))
        _no_args(rest, "end")
        return ("if", branches, other), k


def _parse_range(items, k: int, tokens):
    body, (word, rest, k) = _parse_list(items, k, ("end", "else"))
    other: list = []
    if word == "else":
        _no_args(rest, "else")
        other, (_, rest, k) = _parse_list(items, k, ("end",))
    _no_args(rest, "end")
    names, tokens = _range_variables(tokens)
    return ("range", names, _condition(tokens, "range"), body, other), k


def _range_variables(tokens) -> tuple[list[str], list]:
    """($v or $i, $v names, the pipeline's tokens) of `range [$i, ]$v := pipeline`."""
    at = next((i for i, t in enumerate(tokens) if t[1] == ":="), None)
    if at is None:
        return [], tokens
    head = tokens[:at]
    names = [t[1] for t in head[::2]]
    if len(head) not in (1, 3) or any(t[1] != "," for t in head[1::2]):
        raise GoTemplateError("range declares $v := or $i, $v :=")
    if any(t[0] != "var" or "." in t[1] for t in head[::2]):
        raise GoTemplateError(f"range cannot declare {' '.join(t[1] for t in head)}")
    return names, tokens[at + 1 :]


def _condition(tokens, word: str):
    """The pipeline of an if or range (declaring variables there is not implemented)."""
    pipeline = _pipeline(tokens)
    if pipeline[0] is not None:
        raise GoTemplateError(f"a variable declared in {{{{{word}}}}} is not implemented")
    return pipeline


def _no_args(tokens, word: str) -> None:
    if tokens:
        raise GoTemplateError(f"unexpected {tokens[0][1]!r} after {{{{{word}}}}}")


def _pipeline(tokens):
    """(declared variable or None, ":=" or "=", [commands]); a command is a list of operands."""
    decl = op = None
    if len(tokens) > 1 and tokens[0][0] == "var" and tokens[1][1] in (":=", "="):
        if "." in tokens[0][1]:
            raise GoTemplateError(f"cannot assign to {tokens[0][1]}")
        decl, op, tokens = tokens[0][1], tokens[1][1], tokens[2:]
    commands, command = [], []
    k = 0
    while k < len(tokens):
        if tokens[k][1] == "|":
            commands.append(command)
            command, k = [], k + 1
            continue
        operand, k = _operand(tokens, k)
        command.append(operand)
    commands.append(command)
    if any(not c for c in commands):
        raise GoTemplateError("empty command in a pipeline")
    return decl, op, commands


def _operand(tokens, k: int):
    """(operand, index after it): ("lit", value), ("dot",), ("field", chain), ("var", name,
    chain), ("pipe", pipeline, chain) or ("func", name)."""
    kind, text, _ = tokens[k]
    if kind == "op" and text == "(":
        return _group(tokens, k)
    convert = {"str": _unquote, "raw": lambda t: t[1:-1], "num": int}
    if kind in convert:
        return ("lit", convert[kind](text)), k + 1
    if kind == "word" and text in ("true", "false"):
        return ("lit", text == "true"), k + 1
    if kind == "word" and text in _FUNCS:
        return ("func", text), k + 1
    if kind == "var":
        name, *chain = text.split(".")
        return ("var", name, tuple(chain)), k + 1
    if kind == "field":
        return ("field", tuple(text[1:].split("."))), k + 1
    if kind == "dot":
        return ("dot",), k + 1
    raise GoTemplateError(f"{text!r} is not implemented by this interpreter")


def _group(tokens, k: int):
    """A parenthesized pipeline at tokens[k], with the .Field chain right after its ")"."""
    depth = 0
    for j in range(k, len(tokens)):
        if tokens[j][0] == "op":
            depth += {"(": 1, ")": -1}.get(tokens[j][1], 0)
        if depth == 0:
            break
    else:
        raise GoTemplateError("unclosed (")
    inner = _pipeline(tokens[k + 1 : j])
    after = tokens[j + 1] if j + 1 < len(tokens) else None
    if after and after[0] == "field" and after[2] == tokens[j][2] + 1:  # no space: (x).Field
        return ("pipe", inner, tuple(after[1][1:].split("."))), j + 2
    return ("pipe", inner, ()), j + 1


def _unquote(text: str) -> str:
    """A Go interpreted string literal's value."""
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in "xuU01234567":  # \xNN and \NNN are bytes: only ASCII ones here
            n, base, skip = {"x": (2, 16, 2), "u": (4, 16, 2), "U": (8, 16, 2)}.get(e, (3, 8, 1))
            code = int(body[i + skip : i + skip + n], base)
            if e not in "uU" and code > 0x7F:
                raise GoTemplateError(f"byte escape above 0x7f in {text} is not implemented")
            out.append(chr(code))
            i += skip + n
        else:
            raise GoTemplateError(f"unknown escape \\{e} in {text}")
    return "".join(out)


# ---------------------------------------------------------------- execution
def _truth(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str, list, tuple, dict)):
        return bool(value)
    raise GoTemplateError(f"no truth value for {type(value).__name__}")


def _eq(a: Any, *others: Any) -> bool:
    if not others:
        raise GoTemplateError("eq needs at least two arguments")
    for b in others:
        if type(a) is not type(b) or not isinstance(a, (bool, int, str)):
            raise GoTemplateError(f"incompatible types for comparison: {a!r}, {b!r}")
    return any(a == b for b in others)


def _len(x: Any) -> int:
    if isinstance(x, str):
        return len(x.encode())  # Go's len of a string counts bytes
    if isinstance(x, (list, tuple, dict)):
        return len(x)
    raise GoTemplateError(f"len of {type(x).__name__}")


def _slice(x: Any, *bounds: int) -> Any:
    if not isinstance(x, (list, tuple, str)) or len(bounds) > 2:
        raise GoTemplateError("slice takes a list or string and at most two indexes here")
    data = x.encode() if isinstance(x, str) else x
    lo, hi = (list(bounds) + [0, len(data)][len(bounds) :])[:2]
    if not 0 <= lo <= hi <= len(data):
        raise GoTemplateError(f"slice index out of range: [{lo}:{hi}] of {len(data)}")
    return data[lo:hi].decode() if isinstance(x, str) else data[lo:hi]


def _index(x: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(x, dict):
            x = x.get(key)
        elif isinstance(x, (list, tuple)) and isinstance(key, int) and 0 <= key < len(x):
            x = x[key]
        else:
            raise GoTemplateError(f"index {key!r} out of range or not indexable")
    return x


def _not(x: Any) -> bool:
    return not _truth(x)


# and/or are evaluated lazily in _call; the others take evaluated arguments
_FUNCS: dict[str, Any] = {
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "not": _not,
    "len": _len,
    "slice": _slice,
    "index": _index,
    "and": None,
    "or": None,
}


class _Scope:
    def __init__(self, data: Any):
        self.frames: list[dict[str, Any]] = [{"$": data}]

    def get(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")


def _fields(value: Any, chain: tuple[str, ...]) -> Any:
    for name in chain:
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"can't evaluate field {name} in {type(value).__name__}")
        value = value[name]
    return value


def _arg(operand, dot: Any, scope: _Scope) -> Any:
    kind = operand[0]
    if kind == "lit":
        return operand[1]
    if kind == "dot":
        return dot
    if kind == "field":
        return _fields(dot, operand[1])
    if kind == "var":
        return _fields(scope.get(operand[1]), operand[2])
    if kind == "pipe":
        return _fields(_eval(operand[1], dot, scope), operand[2])
    raise GoTemplateError(f"{operand[1]} is a function: call it as a command")


def _call(command, dot: Any, scope: _Scope, piped: tuple) -> Any:
    head, *rest = command
    if head[0] != "func":
        if rest or piped:
            raise GoTemplateError("can't give arguments to a non-function")
        return _arg(head, dot, scope)
    name = head[1]
    if name in ("and", "or"):  # short-circuit: stop at the first false (and) / true (or)
        args = [lambda o=o: _arg(o, dot, scope) for o in rest] + [lambda v=v: v for v in piped]
        if not args:
            raise GoTemplateError(f"{name} needs arguments")
        for get in args:
            value = get()
            if _truth(value) != (name == "and"):
                return value
        return value
    args = [_arg(o, dot, scope) for o in rest] + list(piped)
    try:
        return _FUNCS[name](*args)
    except TypeError as e:
        raise GoTemplateError(f"wrong number of arguments for {name}: {e}") from None


def _eval(pipeline, dot: Any, scope: _Scope) -> Any:
    decl, op, commands = pipeline
    piped: tuple = ()
    for command in commands:
        piped = (_call(command, dot, scope, piped),)
    value = piped[0]
    if op == ":=":
        scope.frames[-1][decl] = value
    elif op == "=":
        scope.assign(decl, value)
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value)
    raise GoTemplateError(f"printing a {type(value).__name__} is not implemented")


def _run(nodes, dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            value = _eval(node[1], dot, scope)
            if node[1][0] is None:  # a declaration prints nothing
                out.append(_text(value))
        elif kind == "if":
            body = next((b for p, b in node[1] if _truth(_eval(p, dot, scope))), node[2])
            _block(body, dot, scope, out, {})
        else:
            _range(node, dot, scope, out)


def _block(nodes, dot: Any, scope: _Scope, out: list[str], names: dict[str, Any]) -> None:
    scope.frames.append(names)
    try:
        _run(nodes, dot, scope, out)
    finally:
        scope.frames.pop()


def _range(node, dot: Any, scope: _Scope, out: list[str]) -> None:
    _, names, pipeline, body, other = node
    items = _eval(pipeline, dot, scope)
    if not isinstance(items, (list, tuple)):
        raise GoTemplateError(f"range over {type(items).__name__} is not implemented")
    if not items:
        _block(other, dot, scope, out, {})
    for i, item in enumerate(items):
        bound = dict(zip(names, [i, item] if len(names) == 2 else [item]))
        _block(body, item, scope, out, bound)


def render(source: str, data: Any) -> str:
    """The text Go's text/template renders from `source` with `data` (dicts for Go maps and
    structs, lists for slices, str/int/bool for values)."""
    out: list[str] = []
    _run(_parse(_lex(source)), data, _Scope(data), out)
    return "".join(out)
