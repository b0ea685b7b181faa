"""lowbit's modules import down the layers (DESIGN.md): quant -> nn -> prepare -> pipelines -> deploy,
the CLI on top and imported by nothing, no import cycle, and imports inside functions only to defer
an optional dependency (read from the source, tests/import_graph.py)."""

import ast

from import_graph import cycles, graph, imports_of, lowbit_imports, module_files

# Optional dependencies (extras) and slow-to-import ones that may be imported where they are used, not at
# module level; anything else inside a function is a smell the layering should remove.
DEFERRABLE = ("onnx", "onnxruntime", "matplotlib", "tqdm", "sklearn", "skimage", "PIL", "transformers", "gguf",
              "accelerate", "minatar", "gymnasium", "ale_py", "cv2", "torch.utils.tensorboard", "torchao", "tokenizers",
              "torch.distributed.fsdp", "torch.distributed.checkpoint")
# lowbit's layers, lowest first: a module may import its own layer and the layers below it.
LAYERS = [
    ("lowbit.errors", "lowbit.version", "lowbit.files", "lowbit.quant"),
    ("lowbit.nn", "lowbit.recipe", "lowbit.checkpoint", "lowbit.progress", "lowbit.plot", "lowbit.data"),
    ("lowbit.prepare", "lowbit.summary", "lowbit.evaluate", "lowbit.zoo"),
    ("lowbit.qat", "lowbit.mixed", "lowbit.llm", "lowbit.rl", "lowbit.serialize", "lowbit.train"),
    ("lowbit.deploy",),
    ("lowbit.exports", "lowbit.demo", "lowbit", "lowbit.__main__", "lowbit.cli"),
]


def layer_of(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_layering.py: place it"
    return best[0]


def test_lowbit_has_no_import_cycle():
    assert cycles(graph(lowbit_imports())) == []


def test_nothing_imports_the_cli():
    bad = [f"{i.source}:{i.line}" for i in lowbit_imports()
           if (i.target == "lowbit.cli" or i.target.startswith("lowbit.cli.")) and not i.source.startswith(
               ("lowbit.cli", "lowbit.__main__"))]
    assert bad == []


def test_imports_point_down_the_layers():
    # pipelines may use one another's public building blocks within the same layer (rl evaluates
    # exported students, llm reuses the qat trainer), never a layer above
    upward = [f"{i.source}:{i.line} imports {i.target}" for i in lowbit_imports()
              if i.target.startswith("lowbit") and layer_of(i.target) > layer_of(i.source)
              and i.target != "lowbit.deploy" and not i.target.startswith("lowbit.deploy.")]
    upward += [f"{i.source}:{i.line} imports {i.target}" for i in lowbit_imports()
               if i.target.startswith("lowbit.deploy") and layer_of(i.source) < layer_of("lowbit.qat")]
    assert upward == []


def test_the_graph_resolves_submodules_and_sees_cycles():
    known = {"lowbit", "lowbit.a", "lowbit.a.b", "lowbit.c"}
    tree = ast.parse("from lowbit.a import b\nfrom lowbit import c\ndef f():\n    import lowbit\n")
    found = [(i.target, i.in_function) for i in imports_of("lowbit.c", tree, known)]
    assert found == [("lowbit.a.b", False), ("lowbit.c", False), ("lowbit", True)]
    assert cycles({"lowbit.a": {"lowbit.c"}, "lowbit.c": {"lowbit.a"}}) == [["lowbit.a", "lowbit.c"]]


def _has_reason(lines: list[str], line: int) -> bool:
    """A ``#`` comment on the import's line or on the run of import, ``try:`` and blank lines just above it."""
    for text in reversed(lines[:line]):
        if "#" in text:
            return True
        if text.strip() and not text.strip().startswith(("import ", "from ", "try:")):
            return False
    return False


def test_imports_inside_functions_defer_an_optional_dependency_and_say_why():
    # STYLE: an import inside a function needs a one-line reason; lowbit's own modules never need deferring
    files = module_files()
    found = [i for i in lowbit_imports() if i.in_function]
    wrong = [f"{i.source}:{i.line} imports {i.target}" for i in found
             if not any(i.target == d or i.target.startswith(d + ".") for d in DEFERRABLE)]
    lines = {name: path.read_text().splitlines() for name, path in files.items()}
    silent = [f"{i.source}:{i.line} imports {i.target} without a comment saying why" for i in found
              if not _has_reason(lines[i.source], i.line)]
    assert wrong + silent == []
