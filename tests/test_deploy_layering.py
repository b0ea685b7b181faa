"""The deploy package knows only the model it is handed and the layers below it (read from the source with ast)."""

import ast
from pathlib import Path

import lowbit

DEPLOY = Path(lowbit.__file__).parent / "deploy"
FORBIDDEN = ("lowbit.cli", "lowbit.zoo")
DEFERRABLE = ("onnx", "onnxruntime")  # optional dependencies, imported where they are used


def _imports(tree: ast.AST):
    """``(module imported, node, inside a function)`` for every import statement of ``tree``."""
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn) if n is not fn}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "lowbit.deploy" if node.level else node.module  # a relative import stays inside the package
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            yield name, node, id(node) in inside


def test_deploy_modules_import_neither_cli_nor_zoo():
    modules = sorted(DEPLOY.glob("*.py"))
    assert {p.name for p in modules} >= {"build.py", "write.py", "read.py", "rebuild.py", "format.py", "sizes.py"}
    bad = [f"{p.name}:{node.lineno} imports {name}" for p in modules
           for name, node, _ in _imports(ast.parse(p.read_text()))
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == []


def test_deploy_imports_inside_functions_only_defer_onnx():
    late = [f"{p.name}:{node.lineno} imports {name}" for p in sorted(DEPLOY.glob("*.py"))
            for name, node, in_function in _imports(ast.parse(p.read_text()))
            if in_function and name.split(".")[0] not in DEFERRABLE]
    assert late == []


def test_the_check_sees_a_forbidden_import():
    tree = ast.parse("def f():\n    from lowbit.zoo import create_model\nfrom lowbit import cli\n")
    found = [(name, in_function) for name, _, in_function in _imports(tree)]
    assert ("lowbit.zoo", True) in found and ("lowbit.cli", False) in found
