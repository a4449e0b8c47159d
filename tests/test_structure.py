"""The package's import graph: no private name crosses a file, no cycle, no upward arrow.

Read from the source with ``ast`` (imports inside functions included), so a cycle cannot
hide behind a function-level import.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "lcr_lightly"
# The runner (CLI, configs, studies) may import the library, never the reverse; the
# package root re-exports both and loads the runner's ``load_model`` lazily.
RUNNER = "lcr_lightly.experiments"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> Dict[str, List[ast.ImportFrom]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        found[_module(path)] = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lcr_lightly")
        ]
    return found


def test_no_private_name_is_imported_from_another_file():
    private = [
        f"{module} imports {alias.name} from {node.module}"
        for module, nodes in _imports().items()
        for node in nodes
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert private == []


def test_the_import_graph_has_no_cycle():
    modules = _imports()
    graph: Dict[str, Set[str]] = {}
    for module, nodes in modules.items():
        targets = set()
        for node in nodes:
            target = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                if f"{target}.{alias.name}" in modules:
                    targets.add(f"{target}.{alias.name}")
            if target in modules:
                targets.add(target)
        # a package's __init__ re-exports its children: not an arrow of the child's own
        graph[module] = {t for t in targets if t != module and not module.startswith(t + ".")}
    if "lcr_lightly" in graph:  # the root only re-exports
        del graph["lcr_lightly"]
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_library_never_imports_the_experiment_runner():
    upward = [
        f"{module} imports {node.module}"
        for module, nodes in _imports().items()
        for node in nodes
        if not module.startswith(RUNNER)
        and module != "lcr_lightly"
        and (node.module or "").startswith(RUNNER)
    ]
    assert upward == []
