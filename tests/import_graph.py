"""lowbit's module import graph, read from the source with ``ast`` (nothing is imported).

An edge ``a -> b`` for every import statement of module ``a`` that names lowbit module ``b``,
at module level or inside a function: ``import x.y`` names ``x.y``; ``from x import y`` names the
submodule ``x.y`` when there is one, else ``x``. A module's own parent packages are not edges
(Python imports them first in any case).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import lowbit

PACKAGE = Path(lowbit.__file__).parent


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@dataclass(frozen=True)
class Import:
    source: str      # the importing module
    target: str      # the imported module (dotted name; may be outside lowbit)
    line: int
    in_function: bool


def imports_of(name: str, tree: ast.AST, known: set[str]) -> list[Import]:
    """Every import of module ``name`` (``tree``: its source), resolved to module names."""
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn) if n is not fn}
    is_package = name in known and any(k.startswith(name + ".") for k in known)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            out.append(Import(name, target, node.lineno, id(node) in inside))
    return out


def lowbit_imports() -> list[Import]:
    """Every import statement of every lowbit module."""
    files = module_files()
    known = set(files)
    return [imp for name, path in files.items() for imp in imports_of(name, ast.parse(path.read_text()), known)]


def graph(imports: list[Import]) -> dict[str, set[str]]:
    """``{module: lowbit modules it imports}``, without edges to its own parent packages."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target.split(".")[0] == "lowbit" and not imp.source.startswith(imp.target + ".") \
                and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found
