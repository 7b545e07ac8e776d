"""The package's layout: imports flow one way (the CLI → stages → shared modules), and the command line answers
`--help` without loading a library."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "qlora_pipe"
STAGES = {
    "train",
    "train_diffusion",
    "merge",
    "merge_diffusion",
    "export",
    "loftq",
    "evaluate",
    "generate",
    "report",
    "estimate",
    "analysis",
    "combine",
}
LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "safetensors", "numpy")


def imports(module: str) -> tuple[set[str], set[str]]:
    """The qlora_pipe modules `module` imports at its top level, and inside functions."""
    top, inner = set(), set()
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.removeprefix("qlora_pipe.") for a in node.names if a.name.startswith("qlora_pipe.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "qlora_pipe":  # from qlora_pipe import data, model
            names = {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora_pipe."):
            names = {node.module.removeprefix("qlora_pipe.")}
        else:
            continue
        (top if node in tree.body else inner).update(names)
    return top, inner


def test_building_the_parser_imports_no_library():
    code = (
        "import sys\nfrom qlora_pipe import cli\ncli.parser().format_help()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {LIBRARIES!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_imports_flow_one_way():
    # `python -m qlora_pipe` (__main__) is the command line's entry point: it imports the CLI, and nothing else does.
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert imports("__main__") == ({"cli"}, set())
    graph = {}
    for module in modules:
        top, inner = imports(module)
        graph[module] = top | inner
        if module != "cli":  # the CLI imports each stage when its command runs; nothing else hides an import
            assert not inner, f"{module} imports {sorted(inner)} inside a function"
        if module not in STAGES | {"cli"}:
            assert not graph[module] & (STAGES | {"cli"}), f"shared module {module} imports a stage"
    assert not any("cli" in deps for deps in graph.values())

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' → '.join((*path, module))}"
        for dep in graph[module]:
            visit(dep, (*path, module))

    for module in modules:
        visit(module, ())
