"""Print docs/layout.md: every package and module of the tree with the summary of its docstring.

    python scripts/layout.py            # print it
    python scripts/layout.py --write    # regenerate docs/layout.md (tests/test_docs.py checks it)

Reads files only (ast, no imports), so it runs in any Python >= 3.11 without the dependencies.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = """# Layout

Every package and module with the summary of its docstring (for a script or recipe: its first
comment). Generated from the tree by `python scripts/layout.py --write`; do not edit by hand.
"""
SENTENCE_END = re.compile(r"(?<=[a-z0-9)`]\.)\s+(?=[A-Z`])")


def summary(path: Path) -> str:
    """The first sentence of a module's docstring (or of a file's leading comment, up to its
    first indented line: the commands recipes list)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
    else:  # .toml, .sh
        comment = []
        for line in text.splitlines():
            if line.startswith("#!"):
                continue
            body = line[1:] if line.startswith("#") else None
            if body is None or not body.strip() or body.startswith("  "):
                break
            comment.append(body.strip())
        doc = "\n".join(comment)
    para = " ".join(doc.strip().split("\n\n")[0].split())
    return SENTENCE_END.split(para, maxsplit=1)[0]


def entry(path: Path, depth: int) -> str:
    name = path.name + ("/" if path.is_dir() else "")
    if path.is_dir() and not (path / "__init__.py").is_file():
        kinds = sorted({p.suffix or p.name for p in path.iterdir() if p.is_file()})
        about = f"data files ({', '.join(kinds)})"
    else:
        about = summary(path / "__init__.py" if path.is_dir() else path)
    return "  " * depth + f"- `{name}`" + (f" — {about}" if about else "")


def tree(pkg: Path, depth: int = 0) -> list[str]:
    """A package's line, then its modules, then its subfolders (packages and data)."""
    lines = [entry(pkg, depth)]
    if not (pkg / "__init__.py").is_file():  # data; recipes shipped in the package are listed
        return lines + [entry(p, depth + 1) for p in sorted(pkg.glob("*.toml"))]
    children = sorted(pkg.iterdir(), key=lambda p: (p.is_dir(), p.name))
    for child in children:
        if child.name.startswith(("_", ".")):
            continue
        if child.is_dir():
            lines += tree(child, depth + 1)
        elif child.suffix == ".py":
            lines.append(entry(child, depth + 1))
    return lines


def files(folder: str, patterns: tuple[str, ...]) -> list[str]:
    """A top-level folder's line, then its scripts or recipes matching `patterns`."""
    root = ROOT / folder
    if not root.is_dir():
        return []
    found = sorted({p for pat in patterns for p in root.glob(pat)})
    return [f"- `{folder}/`"] + [entry(p, 1) for p in found]


def render() -> str:
    parts = [HEADER, "## The package\n", "\n".join(tree(ROOT / "zerolm")) + "\n"]
    tests = sorted(p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name[0] != "_")
    parts += [
        "## Around it\n",
        "\n".join(
            files("recipes", ("*.toml",))
            + files("scripts", ("*.py", "*.sh"))
            + files("bench", ("*.py",))
            + [f"- `tests/` — mirrors the package: {', '.join(f'`{t}/`' for t in tests)}"]
        )
        + "\n",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--write"]:
        (ROOT / "docs" / "layout.md").write_text(text, encoding="utf-8")
    elif sys.argv[1:]:
        sys.exit(f"usage: python {Path(__file__).name} [--write]")
    else:
        sys.stdout.write(text)
