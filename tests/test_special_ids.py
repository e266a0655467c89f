"""No code outside zerolm/tokenizer/ assumes zerolm's special-token ids (0..15) or token strings
(issue 20): a foreign tokenizer puts its specials anywhere and names them its own way, so
everything else asks the tokenizer by role (tok.pad_id, tok.eos_ids, tok.stop_ids, tok.cls_id,
tok.special_ids, ...).

An AST scan of every module of the package names file:line and the fix. It flags:
- import: SPECIAL_TOKENS, BYTE_TOKENS, BERT_SPECIALS or a role string (PAD, EOS, END, CLS, ...)
  taken from zerolm.tokenizer;
- token-string: a string constant (not a docstring) holding a `<|name|>` token or a BERT special
  ("[CLS]"); the web UI's files are scanned for `<|name|>` too;
- token_id: tok.token_id("...") or tok.token_id(EOS): a special token looked up by its string;
- role-literal: a small int (0..16) given to a name of a special-token role (pad, bos, eos, unk,
  cls, sep, mask_id, end_id, stop_ids, *_token_id, n_special, ...) as a default argument,
  keyword argument or assignment, or compared with one (`eos == 2`);
- id-literal: a small int indexing a per-token table (an embedding's or head's rows,
  token_bytes) or given to id_to_token / token_str / decode.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"SPECIAL_TOKENS", "BYTE_TOKENS", "BERT_SPECIALS"}
NAMES |= {"PAD", "BOS", "EOS", "UNK", "SYSTEM", "USER", "ASSISTANT", "END", "CLS", "SEP", "MASK"}
TOKEN = re.compile(r"<\|[A-Za-z][A-Za-z0-9_]*\|>|&lt;\|[A-Za-z][A-Za-z0-9_]*\|&gt;")
BERT_STRINGS = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
ROLE = re.compile(
    r"(?:^|_)(?:pad|bos|eos|unk|cls|sep)(?:_token)?(?:_ids?)?$"  # pad, pad_id, eos_token_id
    r"|(?:^|_)(?:mask|end|stop)(?:_token)?_ids?$|_token_ids?$"  # mask_id, stop_ids
    r"|(?:^|_)(?:n_special|first_normal)$",
    re.IGNORECASE,
)
TABLE = re.compile(  # an embedding's or head's rows, token_bytes: one entry per token id
    r"(?:embed\w*|wte|tok_emb\w*|lm_head|head)\.weight$|(?:^|\.)(?:token_bytes|vocab)$",
    re.IGNORECASE,
)
LOOKUPS = {"id_to_token", "token_str", "decode"}
FIX = {
    "import": "ask the tokenizer by role (tok.pad_id, tok.eos_ids, tok.stop_ids, tok.cls_id, "
    "tok.special_ids, tok.special_tokens())",
    "token-string": "take the token from the tokenizer (tok.special_tokens(), tok.token_str(i))",
    "token_id": "use the role property (tok.eos_id, tok.turn_end, tok.cls_id, tok.mask_id, ...)",
    "role-literal": "pass the id from the tokenizer's role (tok.pad_id, tok.bos_id, ...)",
    "id-literal": "use the role's id from the tokenizer, not a number",
}
# Findings in files other helpers own, each to be removed once fixed there (a stale entry fails).
KNOWN = {}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    kind: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what} -> {FIX[self.kind]}"


def _small_int(node: ast.AST | None) -> bool:
    """An int literal 0..16 (zerolm's reserved ids and their count), a tuple/list of them, or
    a fallback to one (`x if c else 0`, `x or 0`)."""
    if isinstance(node, ast.IfExp):
        return _small_int(node.body) or _small_int(node.orelse)
    if isinstance(node, ast.BoolOp):
        return any(_small_int(v) for v in node.values)
    if isinstance(node, ast.Constant):
        return type(node.value) is int and 0 <= node.value <= 16
    if isinstance(node, ast.Tuple | ast.List):
        return bool(node.elts) and all(_small_int(e) for e in node.elts)
    return False


def _role_literal(name: str, value: ast.AST | None) -> bool:
    """A small int for a role name; a tuple of them only for a plural one (stop_ids=(0, 2), not
    F.pad's pad=(0, 1))."""
    if not ROLE.search(name):
        return False
    if isinstance(value, ast.Tuple | ast.List):
        return name.lower().endswith(("ids", "token_id")) and _small_int(value)
    return _small_int(value)


def _name(node: ast.AST) -> str:
    """The last name of a Name, Attribute or Subscript chain (`self.cfg.eos_id[0]` -> eos_id)."""
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else ""


def _chain(node: ast.AST) -> str:
    """A dotted Name/Attribute chain as text (`model.embed.weight`), '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


class _Scan(ast.NodeVisitor):
    def __init__(self, path: str, tree: ast.AST):
        self.path, self.found, self.docs = path, [], _docstrings(tree)
        self.modules: set[str] = set()  # local names bound to zerolm.tokenizer modules

    def add(self, node: ast.AST, kind: str, what: str) -> None:
        self.found.append(Finding(self.path, getattr(node, "lineno", 0), kind, what))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.startswith("zerolm.tokenizer"):
                self.modules.add(a.asname or a.name)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        for a in node.names:
            if module.startswith("zerolm.tokenizer") and a.name in NAMES:
                self.add(node, "import", f"imports {a.name} from {module}")
            if (module == "zerolm" and a.name == "tokenizer") or module == "zerolm.tokenizer":
                self.modules.add(a.asname or a.name)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in NAMES and _chain(node.value) in self.modules | {"zerolm.tokenizer"}:
            self.add(node, "import", f"uses {_chain(node)}")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and id(node) not in self.docs:
            hit = TOKEN.search(node.value)
            if hit or node.value in BERT_STRINGS:
                self.add(node, "token-string", f"string {hit[0] if hit else node.value!r}")

    def visit_Call(self, node: ast.Call) -> None:
        fn, first = _name(node.func), node.args[0] if node.args else None
        if fn == "token_id" and (
            isinstance(first, ast.Constant) or (isinstance(first, ast.Name) and first.id in NAMES)
        ):
            self.add(node, "token_id", f"token_id({ast.unparse(first)})")
        if fn in LOOKUPS and any(_small_int(a) for a in node.args):
            self.add(node, "id-literal", f"{ast.unparse(node)}")
        for k in node.keywords:
            if k.arg and _role_literal(k.arg, k.value):
                self.add(k.value, "role-literal", f"{k.arg}={ast.unparse(k.value)}")
        self.generic_visit(node)

    def _defaults(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        a = node.args
        positional = [*a.posonlyargs, *a.args]
        pairs = list(zip(positional[len(positional) - len(a.defaults) :], a.defaults))
        pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
        for arg, default in pairs:
            if _role_literal(arg.arg, default):
                self.add(default, "role-literal", f"default {arg.arg}={ast.unparse(default)}")
        self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = _defaults

    def _assigned(self, target: ast.AST, value: ast.AST | None) -> None:
        if isinstance(target, ast.Tuple | ast.List) and isinstance(value, ast.Tuple | ast.List):
            for t, v in zip(target.elts, value.elts):
                self._assigned(t, v)
        elif not isinstance(target, ast.Subscript) and _role_literal(_name(target), value):
            self.add(target, "role-literal", f"{_name(target)} = {ast.unparse(value)}")

    def visit_Assign(self, node: ast.Assign) -> None:
        for t in node.targets:
            self._assigned(t, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._assigned(node.target, node.value)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        sides = [node.left, *node.comparators]
        if any(_small_int(s) for s in sides) and any(
            not isinstance(s, ast.Constant) and ROLE.search(_name(s)) for s in sides
        ):
            self.add(node, "role-literal", f"compares {ast.unparse(node)}")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        index = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice
        if _small_int(index) and TABLE.search(_chain(node.value)):
            self.add(node, "id-literal", f"{ast.unparse(node)} (row of a per-token table)")
        self.generic_visit(node)


def check_source(source: str, path: str = "<string>") -> list[Finding]:
    """Every finding in one module's source."""
    tree = ast.parse(source, path)
    scan = _Scan(path, tree)
    scan.visit(tree)
    return sorted(scan.found, key=lambda f: (f.line, f.kind))


def check_package(root: Path = ROOT) -> list[tuple[Finding, str]]:
    """(finding, its source line) for every module of root/zerolm/ outside zerolm/tokenizer/,
    and every `<|name|>` string in the web UI's files."""
    package, out = root / "zerolm", []
    for file in sorted(package.rglob("*.py")):
        if package / "tokenizer" in file.parents:
            continue
        text, rel = file.read_text(encoding="utf-8"), file.relative_to(root).as_posix()
        lines = text.splitlines()
        out += [(f, lines[f.line - 1].strip()) for f in check_source(text, rel)]
    for file in sorted((package / "serve" / "static").glob("*")):
        rel = file.relative_to(root).as_posix()
        for i, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if hit := TOKEN.search(line):
                out.append((Finding(rel, i, "token-string", f"string {hit[0]!r}"), line.strip()))
    return out


def unexplained(found: list[tuple[Finding, str]]) -> tuple[list[str], list[tuple]]:
    """(messages of the findings KNOWN does not list, KNOWN entries nothing matches)."""

    def known(f: Finding, line: str) -> tuple | None:
        return next((k for k in KNOWN if (f.path, f.kind) == k[:2] and k[2] in line), None)

    bad = [str(f) for f, line in found if known(f, line) is None]
    return bad, sorted(set(KNOWN) - {known(f, line) for f, line in found})


def test_no_code_outside_the_tokenizer_assumes_special_ids_or_strings():
    bad, stale = unexplained(check_package())
    assert not bad, "special-token ids or strings assumed outside zerolm/tokenizer/:\n" + "\n".join(
        bad
    )
    assert not stale, f"fixed: remove {stale} from KNOWN"


BAD = '''
"""A docstring may show <|end|> and [CLS]."""
from zerolm.tokenizer import EOS, SPECIAL_TOKENS, Tokenizer
from zerolm.tokenizer.specials import BYTE_TOKENS
import zerolm.tokenizer as ztok

def f(tok, ids, pad_id: int = 0, *, eos=2):
    stop = "<|end|>"
    cls = tok.token_id("[CLS]")
    end = tok.token_id(EOS)
    bos_id = 1
    if ids[-1] == 2 or tok.eos_id != 2:
        pass
    config = dict(pad_token_id=0, decoder_start_token_id=1, stop_ids=(0, 7))
    row = model.embed.weight[0]
    name = tok.hf.id_to_token(3)
    unk_id = tok.unk_id if tok else 0
    return ztok.SPECIAL_TOKENS, f"ends with <|eos|>", "[MASK]"
'''
GOOD = '''
"""Near misses: positions, sizes and names that are not special-token roles."""
import torch.nn.functional as F
from zerolm.tokenizer import Tokenizer

def g(tok, ids, name: str, start: int = 0, end: int = 0, batch_size: int = 16, mask_prob=0.15):
    """Docstring: stops at <|end|>."""
    first, eos = tok.eos_ids[0], tok.eos_id
    lo, hi = 0, 2
    width = tok.vocab_size if tok else 0
    x = F.pad(ids, (0, 1), value=tok.pad_id) + F.pad(ids, pad=(0, 1))
    heads = model.heads[0] + model.blocks[0].attn.head_dim
    segments = pad_right(ids, 0, 8)  # segment ids, not token ids
    n = ids[:, 0] == eos
    stop_at = tok.token_id(name)
    mask = ids != tok.pad_id
    return model.blocks[0], tok.decode(ids), end == 0, len(ids) == 2, "<|not a token"
'''


def test_the_checker_reports_each_kind_and_nothing_else():
    found = check_source(BAD, "bad.py")
    got = {(f.line, f.kind) for f in found}
    want = {
        (3, "import"),  # EOS
        (4, "import"),  # BYTE_TOKENS
        (7, "role-literal"),  # pad_id: int = 0
        (8, "token-string"),
        (9, "token_id"),
        (9, "token-string"),  # "[CLS]"
        (10, "token_id"),
        (11, "role-literal"),  # bos_id = 1
        (12, "role-literal"),  # eos_id != 2
        (14, "role-literal"),  # pad_token_id=0, decoder_start_token_id=1
        (15, "id-literal"),
        (16, "id-literal"),
        (17, "role-literal"),  # unk_id = ... else 0
        (18, "import"),  # ztok.SPECIAL_TOKENS
        (18, "token-string"),  # <|eos|>, "[MASK]"
    }
    assert got == want, "\n".join(map(str, found))
    assert sum(f.line == 3 for f in found) == 2 and sum(f.line == 7 for f in found) == 2  # eos=2
    assert sum(f.line == 14 for f in found) == 3 and sum(f.line == 18 for f in found) == 3
    message = str(next(f for f in found if f.kind == "token_id"))
    assert message.startswith("bad.py:9: token_id('[CLS]') -> use the role property")
    assert check_source(GOOD, "good.py") == []


def test_the_package_scan_covers_modules_and_the_web_ui_and_stale_entries(tmp_path):
    ui = tmp_path / "zerolm" / "serve" / "static"
    ui.mkdir(parents=True)
    (ui / "index.html").write_text('<div>stops at &lt;|end|&gt;</div>\n<script>"<|im_end|>"')
    (tmp_path / "zerolm" / "a.py").write_text("PAD_ID = 0\n")
    (tmp_path / "zerolm" / "tokenizer").mkdir()
    (tmp_path / "zerolm" / "tokenizer" / "specials.py").write_text('PAD = "<|pad|>"\n')
    bad, stale = unexplained(check_package(tmp_path))
    assert bad == [
        f"zerolm/a.py:1: PAD_ID = 0 -> {FIX['role-literal']}",
        f"zerolm/serve/static/index.html:1: string '&lt;|end|&gt;' -> {FIX['token-string']}",
        f"zerolm/serve/static/index.html:2: string '<|im_end|>' -> {FIX['token-string']}",
    ]  # zerolm/tokenizer/ itself is exempt
    assert stale == sorted(KNOWN)  # an entry whose finding is gone must be removed
