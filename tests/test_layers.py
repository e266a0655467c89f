"""The package's import graph follows its layers: no module imports a higher layer, and no two
packages import each other (directly or round a longer loop).

Every `import` / `from ... import` of a zerolm module counts, also inside functions (a
function-level import hides an edge, it does not remove it). A unit is a subpackage
(zerolm/data/...) or a root module (zerolm/config.py). Units of one rank may import each other
as long as that makes no cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import zerolm

ROOT = Path(zerolm.__file__).parent

# rank: the units a module of that rank may import are those of its rank or lower.
# files.py (atomic writes) is below everything, config.py right above it; speedrun.py, api.py,
# commands/ and cli.py are the programs on top, and the package root (__init__, __main__) exports /
# runs them.
LAYERS: dict[str, int] = {
    "files": 0,
    "config": 1,
    "tokenizer": 2,
    "model": 2,
    "quant": 2,  # quantized layers and kernels: model/io.py loads a quantized model
    "transforms": 3,
    "data": 3,
    "infer": 3,
    "dist": 3,  # the torchrun process group and tensor-parallel inference; train/ builds on it
    "interop": 3,
    "inspect": 3,
    "eval": 4,
    "serve": 4,
    "train": 5,
    "tasks": 5,  # a task builds on data/, infer/, eval/; the stages above plug it in by name
    "finetune": 6,
    "align": 6,
    "speedrun": 7,
    "api": 7,  # zerolm.load / zerolm.fit: the stages and the engine for notebooks
    "commands": 8,  # one module per command group, dispatched by cli.py
    "cli": 8,
    "__init__": 9,
    "__main__": 9,
}


def unit_of(module: str) -> str:
    """'zerolm.data.sft' -> 'data'; 'zerolm' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every zerolm import in a file, module-level or not."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            # `from zerolm import tokenizer` imports a unit too
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names if mod == "zerolm"]
    return [(line, m) for line, m in found if m == "zerolm" or m.startswith("zerolm.")]


def edges() -> list[tuple[str, str, str]]:
    """(file:line, importing unit, imported unit) for every import across units."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        src = unit_of(module_name(path))
        for line, mod in imported_modules(path):
            dst = unit_of(mod)
            if mod == "zerolm" and path.parent != ROOT:
                dst = "__init__"
            if dst != src:
                out.append((f"{path.relative_to(ROOT.parent)}:{line}", src, dst))
    return out


def upward(all_edges) -> list[str]:
    return [
        f"{where}: {src} (rank {LAYERS[src]}) imports {dst} (rank {LAYERS[dst]})"
        for where, src, dst in all_edges
        if LAYERS[dst] > LAYERS[src]
    ]


def cycles(all_edges) -> list[list[str]]:  # noqa: C901 (Tarjan's algorithm, kept in one piece)
    """The strongly connected components of more than one unit (Tarjan's algorithm)."""
    graph = defaultdict(set)
    for _, src, dst in all_edges:
        graph[src].add(dst)
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in ROOT.rglob("*.py")}
    assert not units - set(LAYERS), f"add {sorted(units - set(LAYERS))} to LAYERS"


def test_no_upward_import():
    bad = upward(edges())
    assert not bad, "lower layers import higher ones:\n" + "\n".join(bad)


def test_no_package_cycle():
    all_edges = edges()
    found = cycles(all_edges)
    detail = [
        f"{' <-> '.join(c)}: "
        + ", ".join(
            f"{w} ({s}->{d})"
            for w, s, d in all_edges
            if s in c and d in c and LAYERS[d] >= LAYERS[s]  # the edges that close the loop
        )
        for c in found
    ]
    assert not found, "package cycles:\n" + "\n".join(detail)


def test_the_checks_catch_what_they_should():
    fake = [("a.py:1", "data", "eval"), ("b.py:2", "eval", "data"), ("c.py:3", "cli", "config")]
    assert upward(fake) == ["a.py:1: data (rank 3) imports eval (rank 4)"]
    assert cycles(fake) == [["data", "eval"]]
