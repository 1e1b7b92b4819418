"""The package's import graph: no cycles, and the method folders keep to their side.

Module-level imports count, those under ``if TYPE_CHECKING`` too (a cycle there is a cycle of
the design, and it turns real as soon as an annotation is evaluated); imports inside functions
run late and do not count. Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` first,
so those count as imported too: a cycle through a package's ``__init__`` breaks ``import`` as
surely as a direct one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "tl_superposition"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> list[str]:
    names: list[str] = []
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.If):
            body += node.body + node.orelse
        elif isinstance(node, ast.Try):
            body += node.body
    return names


def import_graph() -> nx.DiGraph:
    """Module -> module it runs when imported, within ``tl_superposition``."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in _top_level_imports(ast.parse(path.read_text())):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the packages' __init__ run first
                dep = ".".join(parts[:i])
                if dep in modules and dep != name and not name.startswith(dep + "."):
                    graph.add_edge(name, dep)
    return graph


def test_the_package_has_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {[' -> '.join([*c, c[0]]) for c in cycles[:5]]}"


def test_the_cycle_check_finds_a_cycle():
    graph = import_graph()
    graph.add_edge("tl_superposition.models", "tl_superposition.tracing.cli")
    assert list(nx.simple_cycles(graph))


def test_gated_imports_nothing_from_toys_and_the_core_no_method():
    graph = import_graph()
    for module, dep in graph.edges:
        if module.startswith("tl_superposition.gated"):
            assert not dep.startswith("tl_superposition.toys"), (module, dep)
        if module.startswith("tl_superposition.core"):
            assert dep.startswith("tl_superposition.core"), (module, dep)
