"""The package's imports flow one way, and no module imports itself back through others.

[Note: layers] From the bottom: errors and file helpers; the spec; the building blocks a spec names (clocks,
optimizers, losses, synthesizers, the text that describes them); `compile/` (front ends, partition, emit,
unrolling a recurrent core), which never imports a runtime; `interfaces` (what happens at a cut); `runtime/`
(stage state, transports, schedules, placement) with `checkpoint` (the files they write), which works on any program through its attributes and never
imports a program class; the programs (`program`, `recurrent`), which compile a model and build their runtime;
then `train/` (loops, tasks, outputs, launching) and `inspect` (drawings, emitted files); the command line on
top. A module may import from its own layer or below, never above, and the import graph has no cycles.
Imports under `if TYPE_CHECKING:` are for annotations only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import dnicompile

PACKAGE = Path(dnicompile.__file__).parent

LAYERS = [
    ["errors", "files"],
    ["spec"],
    ["clock", "optim", "losses", "synthesizers", "describe"],
    ["compile"],
    ["interfaces"],
    ["runtime", "checkpoint"],
    ["program", "recurrent", "memory_plan"],
    ["train", "inspect"],
    ["cli", "__main__", "__init__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts)


def _top(module: str) -> str:
    return module.split(".")[0]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    """Every dnicompile module `path` imports, at top level or inside functions, as dotted names."""
    tree = ast.parse(path.read_text())
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if path.name == "__init__.py" and module == "__init__":
        package = []
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("dnicompile"):
                target = node.module.removeprefix("dnicompile").lstrip(".")
            else:
                target = None
            if target is not None:
                if node.module is None or not target:
                    found.update(".".join(filter(None, [target, a.name])) for a in node.names)
                else:
                    found.add(target)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dnicompile."):
                    found.add(a.name.removeprefix("dnicompile."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return {f for f in found if f}


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module.endswith(".__init__"):
            module = module.removesuffix(".__init__")
        g.add_node(module)
        for target in _imports(path, module):
            g.add_edge(module, target)
    return g


def test_every_module_has_a_layer():
    missing = sorted(m for m in _graph().nodes if _top(m) not in LAYER)
    assert not missing, f"modules with no layer in tests/test_layers.py: {missing}; add them to LAYERS"


def test_imports_never_go_up():
    upward = []
    for a, b in _graph().edges:
        if LAYER[_top(b)] > LAYER[_top(a)]:
            upward.append(f"{a} (layer {LAYER[_top(a)]}) imports {b} (layer {LAYER[_top(b)]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    g = _graph()
    # a module importing its own package's __init__ is not a cycle of code; drop those edges
    g.remove_edges_from([(a, b) for a, b in list(g.edges) if a.startswith(b + ".")])
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_the_checker_sees_upward_and_nested_imports(tmp_path):
    """The walker itself: a function-level relative import two levels up is found and resolved."""
    src = tmp_path / "m.py"
    src.write_text(
        "from .a import x\n"
        "def f():\n"
        "    from ..program import y\n"
        "    from .. import cli\n"
        "if TYPE_CHECKING:\n"
        "    from ..inspect import z\n"
    )
    assert _imports(src, "runtime.m") == {"runtime.a", "program", "cli"}
